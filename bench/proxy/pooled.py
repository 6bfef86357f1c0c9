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
import os
import sys

from stats import format_ci

TESTS = [
    ("throughput", "(a) 64 KiB throughput", True),
    ("msgs1", "(b) 64 B msgs/s, 1 conn", True),
    ("msgs50", "(b) 64 B msgs/s, 50 conns", True),
    ("latency", "(c) latency p50", False),
    ("handshakes", "(e) handshakes/s", True),
]


def main(dirs):
    if not dirs:
        sys.exit(__doc__)
    ratios = {}
    for d in dirs:
        cells = {}
        if not os.path.isfile(f"{d}/raw.csv"):
            sys.exit(f"pooled.py: {d}: no raw.csv here (not a bench/proxy.sh results folder)")
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
            ahead = sum(1 for r in rs if (r > 1 if higher else r < 1))
            cols += [format_ci(rs), f"{ahead}/{n}"]
        print(f"| {label}{'' if higher else ' (lower is better)'} | {n} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
