#!/usr/bin/env python3
"""Prints bench/auth.sh's Markdown table: the median over rounds of each
cell's handshakes/s and CPU µs per handshake, and what the method adds to
its baseline's CPU.

    table.py OUT_DIR ROUNDS DURATION WARMUP CONNS BCRYPT_COST
"""

import csv
import statistics
import sys
from pathlib import Path

# What each row's added CPU is measured against.
BASELINE = {
    "wsgate: TLS, no client certificate": "wsgate: none",
    "wsgate: mTLS": "wsgate: TLS, no client certificate",
    "nginx: auth_request": "nginx: none",
}

NOTES = {
    "wsgate: Basic, bcrypt cached": "the hash is paid once, then the credential is remembered (`cache_ttl`)",
    "wsgate: Basic, bcrypt not cached": "`cache_ttl = \"0s\"`: one bcrypt per handshake",
    "wsgate: hook, not cached": "CPU includes the auth endpoint (nginx)",
    "wsgate: hook, cached": "CPU includes the auth endpoint (nginx)",
    "wsgate: mTLS": "full TLS handshakes (no resumption), added over TLS alone",
    "wsgate: TLS, no client certificate": "full TLS handshakes (no resumption)",
    "nginx: auth_request": "CPU includes the auth endpoint (same nginx)",
}


def main():
    out = Path(sys.argv[1])
    rounds, duration, warmup, conns, cost = sys.argv[2:7]
    rows: dict[str, list[dict]] = {}
    order: list[str] = []
    with open(out / "raw.csv") as f:
        for r in csv.DictReader(f):
            if r["label"] not in rows:
                order.append(r["label"])
            rows.setdefault(r["label"], []).append(r)

    def med(label, key):
        vals = [float(r[key]) for r in rows.get(label, []) if r[key] not in ("", None)
                and r[key].replace(".", "", 1).isdigit()]
        return statistics.median(vals) if vals else None

    # wsgate rows first, in the order of the first round.
    order.sort(key=lambda label: (not label.startswith("wsgate"), 0))
    print("\n".join(line for line in (out / "meta.txt").read_text().splitlines()))
    print(f"rounds: {rounds}, each cell {warmup} s warm-up + {duration} s measured, {conns} concurrent "
          f"workers; bcrypt cost {cost}\n")
    print("| method | handshakes/s | CPU µs per handshake | added over its baseline | errors | note |")
    print("|---|---:|---:|---:|---:|---|")
    for label in order:
        rate, cpu = med(label, "rate"), med(label, "cpu_us")
        errors = sum(int(r["errors"] or 0) for r in rows[label] if (r["errors"] or "0").isdigit())
        base = BASELINE.get(label, "wsgate: none" if label.startswith("wsgate") else "nginx: none")
        bcpu = med(base, "cpu_us")
        added = "" if base == label or label.endswith(": none") or cpu is None or bcpu is None else f"{cpu - bcpu:+.0f}"
        fmt = lambda v, f: "error" if v is None else format(v, f)  # noqa: E731
        print(f"| {label} | {fmt(rate, '.0f')} | {fmt(cpu, '.0f')} | {added} | {errors} | {NOTES.get(label, '')} |")


if __name__ == "__main__":
    main()
