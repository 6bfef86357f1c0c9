#!/usr/bin/env python3
"""The Markdown table of one `bench/proxy.sh` run, from its results folder.

    bench/proxy/table.py OUT ROUNDS IDLE_ROUNDS DURATION WARMUP IDLE_CONNS CLK_TCK

`proxy.sh` runs it at the end of a run; run it again to re-read a kept
folder. Pooling the rounds of several runs: `bench/proxy/pooled.py`.
"""
import csv, statistics, sys

from stats import format_ci
out, rounds, idle_rounds, dur, warm, idle_conns, clk_tck = sys.argv[1:]
vals = {}
errs = {}
for row in csv.DictReader(open(f"{out}/raw.csv")):
    def num(s):
        try:
            return float(s)
        except ValueError:
            return None
    t, c = row["test"], row["contender"]
    if t == "latency":
        vals.setdefault(("p50", c), []).append(num(row["value"]))
        vals.setdefault(("p99", c), []).append(num(row["value2"]))
    else:
        vals.setdefault((t, c), []).append(num(row["value"]))
    if t == "handshakes" and row["value2"]:
        errs[c] = errs.get(c, 0) + int(row["value2"])
for row in csv.DictReader(open(f"{out}/idle.csv")):
    v = row["kib_per_conn"]
    vals.setdefault(("idle", row["contender"]), []).append(float(v) if v else None)

def med(t, c):
    v = vals.get((t, c), [])
    good = [x for x in v if x is not None]
    if not v:
        return None, 0
    return (statistics.median(good) if good else None), len(v) - len(good)

rows = [
    ("throughput", "(a) 64 KiB throughput, MB/s", "{:.0f}", "higher", "ahead of both"),
    ("msgs1", "(b) 64 B msgs/s, 1 conn", "{:.0f}", "higher", "ahead of both"),
    ("msgs50", "(b) 64 B msgs/s, 50 conns", "{:.0f}", "higher", "ahead of both"),
    ("p50", "(c) latency p50, µs", "{:.1f}", "lower", None),
    ("p99", "(c) latency p99, µs", "{:.1f}", "lower", None),
    ("idle", f"(d) RSS per idle proxied WebSocket, KiB ({idle_conns} conns)", "{:.2f}", "lower", "no worse than nginx"),
    ("handshakes", "(e) handshakes/s (8 workers)", "{:.0f}", "higher", "ahead of both"),
]
meta = open(f"{out}/meta.txt").read().strip().splitlines()
print()
for m in meta:
    print(f"- {m}")
print(f"- medians of {rounds} rounds ({warm} s warm-up + {dur} s each); (d): {idle_rounds} rounds on fresh processes")
print()
print("| test | wsgate | nginx | haproxy | direct (backend) | wsgate/nginx | wsgate/haproxy | target | met |")
print("|---|---:|---:|---:|---:|---:|---:|---|---|")
for t, label, fmt, better, target in rows:
    m = {c: med(t, c) for c in ("wsgate", "nginx", "haproxy", "direct")}
    def cell(c):
        v, bad = m[c]
        if v is None:
            return "—" if bad == 0 else "error"
        return fmt.format(v) + (f" ({bad} failed)" if bad else "")
    w, n, h = m["wsgate"][0], m["nginx"][0], m["haproxy"][0]
    rn = f"{w / n:.2f}" if w and n else "—"
    rh = f"{w / h:.2f}" if w and h else "—"
    met = ""
    if target and w and n and h:
        if target == "ahead of both":
            met = "yes" if w > n and w > h else "**no**"
        else:
            met = "yes" if w <= n else "**no**"
    print(f"| {label} | {cell('wsgate')} | {cell('nginx')} | {cell('haproxy')} | {cell('direct')} | {rn} | {rh} | {target or '(none)'} | {met} |")
print()
print("Ratios are wsgate ÷ the other (higher is better for (a), (b), (e); lower for (c), (d)).")
# Paired view: within a round the contenders run one right after the other,
# so the ratio of their two cells is measured at nearly the same machine
# speed; the speed drifts far more between rounds (steal, other guests) than
# within one. The median of the per-round ratios cancels that drift, which
# the ratio of two medians (taken over different rounds) does not.
per_round = {}
for row in csv.DictReader(open(f"{out}/raw.csv")):
    try:
        v = float(row["value"])  # latency: its p50
    except ValueError:
        continue
    t = "p50" if row["test"] == "latency" else row["test"]
    per_round.setdefault((t, row["round"]), {})[row["contender"]] = v
print()
print(f"Paired per round: the median over {rounds} rounds of each round's ratio, in how many rounds wsgate was better, "
      "and the geometric mean of the ratios with its 95% confidence interval (Student's t on the logs; "
      "an interval wholly above 1 — below 1 for latency — says wsgate is ahead beyond this run's noise):")
print()
print("| test | wsgate/nginx | better than nginx | geomean [95% CI] | wsgate/haproxy | better than haproxy | geomean [95% CI] |")
print("|---|---:|---:|---:|---:|---:|---:|")
for t, label, _, better, _ in rows:
    if t in ("idle", "p99"):
        continue
    cells = [per_round[k] for k in sorted(per_round, key=lambda k: int(k[1])) if k[0] == t]
    out_cells = []
    for other in ("nginx", "haproxy"):
        rs = [c["wsgate"] / c[other] for c in cells if c.get("wsgate") and c.get(other)]
        if not rs:
            out_cells += ["—", "—", "—"]
            continue
        wins = sum(1 for r in rs if (r > 1 if better == "higher" else r < 1))
        out_cells += [f"{statistics.median(rs):.2f}", f"{wins}/{len(rs)}", format_ci(rs)]
    print(f"| {label} | " + " | ".join(out_cells) + " |")
# CPU per unit of work: the contender's CPU time in a cell over the work done
# in it (rate × (warm-up + measured time): the warm-up runs at about the same
# rate). Medians over rounds; "direct" is the backend's own CPU.
cpu = {}
for row in csv.DictReader(open(f"{out}/raw.csv")):
    try:
        v, ticks = float(row["value"]), int(row["cpu_ticks"])
    except (ValueError, TypeError):
        continue
    if v > 0:
        us = ticks / float(clk_tck) * 1e6 / (v * (float(warm) + float(dur)))
        cpu.setdefault((row["test"], row["contender"]), []).append(us)
print()
print("CPU per unit of work, µs (user + system of the proxy's processes; clock ticks of 1/%s s, so ±1 tick per cell):" % clk_tck)
print()
print("| test | wsgate | nginx | haproxy | direct (backend) | wsgate/nginx | wsgate/haproxy |")
print("|---|---:|---:|---:|---:|---:|---:|")
for t, label in [("msgs1", "(b) per message, 1 conn"), ("msgs50", "(b) per message, 50 conns"), ("handshakes", "(e) per handshake")]:
    m = {c: statistics.median(cpu[(t, c)]) if cpu.get((t, c)) else None for c in ("wsgate", "nginx", "haproxy", "direct")}
    f = lambda v: "—" if v is None else f"{v:.2f}"
    r = lambda a, b: "—" if not a or not b else f"{a / b:.2f}"
    print(f"| {label} | {f(m['wsgate'])} | {f(m['nginx'])} | {f(m['haproxy'])} | {f(m['direct'])} | {r(m['wsgate'], m['nginx'])} | {r(m['wsgate'], m['haproxy'])} |")
# Before/after: the current wsgate against the baseline build (WSGATE_BASELINE).
if any(c == "baseline" for (_, c) in vals):
    print()
    print("Before/after, the same run: wsgate ÷ the baseline build (higher is better for (a), (b), (e); lower for (c), (d)); "
          "paired per-round geometric mean with its 95% confidence interval:")
    print()
    print("| test | wsgate | baseline | wsgate/baseline | geomean [95% CI] |")
    print("|---|---:|---:|---:|---:|")
    for t, label, fmt, better, _ in rows:
        w, b = med(t, "wsgate")[0], med(t, "baseline")[0]
        cells = [per_round[k] for k in sorted(per_round, key=lambda k: int(k[1])) if k[0] == t]
        rs = [c["wsgate"] / c["baseline"] for c in cells if c.get("wsgate") and c.get("baseline")]
        ci = format_ci(rs) if len(rs) > 1 else "—"
        f = lambda v: "—" if v is None else fmt.format(v)
        print(f"| {label} | {f(w)} | {f(b)} | {f'{w / b:.2f}' if w and b else '—'} | {ci} |")
if any(errs.values()):
    print("Handshake errors over all rounds: " + ", ".join(f"{c} {n}" for c, n in errs.items()))
print(f"Raw values: {out}/raw.csv, {out}/idle.csv")
