#!/usr/bin/env python3
"""Pools the rounds of several `bench/proxy.sh` runs (their results folders)
into one paired comparison: for each test, every round's wsgate/nginx and
wsgate/haproxy ratio, their geometric mean with a 95% confidence interval,
and in how many rounds wsgate was ahead.

    bench/proxy/pooled.py bench/results/proxy-A bench/results/proxy-B ...

One run's 9 rounds cannot separate a few percent from this VM's noise (rates
swing up to 2x between rounds); tens of rounds can. Pool only runs of the
same code and machine.
"""
import csv
import math
import statistics
import sys

TESTS = [
    ("throughput", "(a) 64 KiB throughput", True),
    ("msgs1", "(b) 64 B msgs/s, 1 conn", True),
    ("msgs50", "(b) 64 B msgs/s, 50 conns", True),
    ("latency", "(c) latency p50", False),
    ("handshakes", "(e) handshakes/s", True),
]


def t975(df):
    """Student's t at 0.975 for `df` degrees of freedom (1.96 past 30)."""
    table = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
             2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]
    return table[df - 1] if df <= len(table) else 1.96


def main(dirs):
    if not dirs:
        sys.exit(__doc__)
    ratios = {}
    for d in dirs:
        cells = {}
        with open(f"{d}/raw.csv") as f:
            for row in csv.DictReader(f):
                try:
                    v = float(row["value"])
                except ValueError:
                    continue
                cells.setdefault((row["test"], row["round"]), {})[row["contender"]] = v
        for (test, _), c in cells.items():
            for other in ("nginx", "haproxy"):
                if c.get("wsgate") and c.get(other):
                    ratios.setdefault((test, other), []).append(c["wsgate"] / c[other])
    print(f"Pooled over {len(dirs)} runs: " + ", ".join(d.rstrip("/").rsplit("/", 1)[-1] for d in dirs))
    print()
    print("| test | rounds | wsgate/nginx geomean [95% CI] | ahead | wsgate/haproxy geomean [95% CI] | ahead |")
    print("|---|---:|---:|---:|---:|---:|")
    for test, label, higher in TESTS:
        cols, n = [], 0
        for other in ("nginx", "haproxy"):
            rs = ratios.get((test, other), [])
            if len(rs) < 2:
                cols += ["—", "—"]
                continue
            n = len(rs)
            logs = [math.log(r) for r in rs]
            m = statistics.fmean(logs)
            h = t975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
            ahead = sum(1 for r in rs if (r > 1 if higher else r < 1))
            cols += [f"{math.exp(m):.3f} [{math.exp(m - h):.3f}, {math.exp(m + h):.3f}]", f"{ahead}/{n}"]
        print(f"| {label}{'' if higher else ' (lower is better)'} | {n} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
