#!/usr/bin/env python3
"""The Markdown tables of one `bench/tunnel.sh` run, from its results folder.

    bench/tunnel/table.py OUT ROUNDS IDLE_ROUNDS DURATION WARMUP

`tunnel.sh` runs it at the end; run it again to re-read a kept folder.
"""
import csv
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proxy"))
from stats import format_ci  # noqa: E402

out, rounds, idle_rounds, dur, warm = sys.argv[1:]
CONTENDERS = ["wsgate", "rathole-tcp", "rathole-ws", "bore", "ssh-L", "ssh-R", "direct"]
OTHERS = ["rathole-tcp", "rathole-ws", "bore", "ssh-L", "ssh-R"]


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


vals: dict = {}
per_round: dict = {}
cpu: dict = {}
errors: dict = {}
for row in csv.DictReader(open(f"{out}/raw.csv")):
    t, c, r = row["test"], row["contender"], row["round"]
    if t == "latency":
        for k, v in (("p50", row["value"]), ("p99", row["value2"])):
            vals.setdefault((k, c), []).append(num(v))
            per_round.setdefault((k, c), {})[r] = num(v)
    else:
        vals.setdefault((t, c), []).append(num(row["value"]))
        per_round.setdefault((t, c), {})[r] = num(row["value"])
        if row["value2"]:
            errors[(t, c)] = errors.get((t, c), 0) + int(row["value2"])
        if row["entry_cpu_ticks"]:
            cpu.setdefault((t, c), []).append((num(row["value"]), int(row["entry_cpu_ticks"]),
                                               int(row["exit_cpu_ticks"] or 0)))

idle: dict = {}
for row in csv.DictReader(open(f"{out}/idle.csv")):
    n = int(row["n"])
    eb, ep = num(row["entry_before_kib"]), num(row["entry_peak_kib"])
    xb, xp = num(row["exit_before_kib"]), num(row["exit_peak_kib"])
    what = row["what"]
    idle.setdefault((what, "entry", row["contender"]), []).append((ep - eb) / n if ep is not None and eb is not None else None)
    if xp is not None and xb is not None and row["exit_peak_kib"] != "":
        idle.setdefault((what, "exit", row["contender"]), []).append((xp - xb) / n)


def med(d, key):
    v = [x for x in d.get(key, []) if x is not None]
    return statistics.median(v) if v else None


def fmt(v, f):
    return "—" if v is None else f.format(v)


meta = open(f"{out}/meta.txt").read().strip().splitlines()
print()
for m in meta:
    print(f"- {m}")
print(f"- medians of {rounds} rounds ({warm} s warm-up + {dur} s per cell); (d): {idle_rounds} rounds on fresh processes")
print()
print("| test | " + " | ".join(CONTENDERS) + " |")
print("|---|" + "---:|" * len(CONTENDERS))
rows = [
    ("throughput", "(a) 64 KiB echo, 1 conn, MB/s", "{:.0f}"),
    ("connections", "(b) new connections/s (8 workers, 64 B round trip each)", "{:.0f}"),
    ("p50", "(c) 64 B ping-pong p50, µs", "{:.1f}"),
    ("p99", "(c) 64 B ping-pong p99, µs", "{:.1f}"),
]
for t, label, f in rows:
    cells = []
    for c in CONTENDERS:
        v = med(vals, (t, c))
        e = errors.get((t, c), 0)
        cells.append(fmt(v, f) + (f" ({e} errors)" if e else ""))
    print(f"| {label} | " + " | ".join(cells) + " |")
for what, side, label in (("streams", "entry", "(d) RSS per open idle stream, entry side, KiB"),
                          ("streams", "exit", "(d) RSS per open idle stream, exit side, KiB"),
                          ("agents", "entry", "(d) RSS per connected idle agent, gateway side, KiB")):
    cells = []
    for c in CONTENDERS:
        v = fmt(med(idle, (what, side, c)), "{:.1f}") if (what, side, c) in idle else "n/a"
        if c == "wsgate" and (what, side, "wsgate-nothp") in idle:
            v += f" ({fmt(med(idle, (what, side, 'wsgate-nothp')), '{:.1f}')} without THP)"
        cells.append(v)
    print(f"| {label} | " + " | ".join(cells) + " |")

print()
print("Entry side: the process(es) holding the port clients connect to (wsgate: the gateway; rathole and bore: "
      "their server; ssh -L: the ssh client; ssh -R: sshd, all its processes). Exit side: the one that connects "
      "to the echo server (wsgate: the agent; rathole: its client; bore: `bore local`; ssh -L: sshd; ssh -R: the "
      "ssh client).")

# ---------------------------------------------------------------- ratios
print()
print("wsgate ÷ each other contender (median of the per-round ratios' geometric mean, 95 % interval; "
      "higher is better for (a) and (b), lower for (c) and (d)):")
print()
print("| test | " + " | ".join(OTHERS) + " |")
print("|---|" + "---:|" * len(OTHERS))
for t, label, _ in rows:
    cells = []
    for c in OTHERS:
        a, b = per_round.get((t, "wsgate"), {}), per_round.get((t, c), {})
        rs = [a[r] / b[r] for r in a if r in b and a[r] and b[r]]
        cells.append(format_ci(rs) if rs else "—")
    print(f"| {label} | " + " | ".join(cells) + " |")

# ---------------------------------------------------------------- targets
def ratio(t, c):
    a, b = med(vals, (t, "wsgate")), med(vals, (t, c))
    return a / b if a and b else None


print()
print("Targets (ratios of medians):")
print()
print("| target | measured | met |")
print("|---|---:|---|")
for t, c, want, label in (
    ("throughput", "rathole-tcp", 1.5, "(a) ≥ 1.5× rathole (TCP transport)"),
    ("throughput", "rathole-ws", 1.5, "(a) ≥ 1.5× rathole (WebSocket transport)"),
    ("throughput", "ssh-L", 2.0, "(a) ≥ 2× ssh -L"),
    ("throughput", "ssh-R", 2.0, "(a) ≥ 2× ssh -R"),
    ("connections", "rathole-tcp", 2.0, "(b) ≥ 2× rathole (TCP transport)"),
    ("connections", "rathole-ws", 2.0, "(b) ≥ 2× rathole (WebSocket transport)"),
    ("connections", "bore", 2.0, "(b) ≥ 2× bore"),
):
    r = ratio(t, c)
    print(f"| {label} | {fmt(r, '{:.2f}×')} | {'—' if r is None else ('yes' if r >= want else '**no**')} |")
d = med(idle, ("streams", "entry", "wsgate"))
print(f"| (d) ≤ 8 KiB per open idle stream (gateway) | {fmt(d, '{:.1f} KiB')} | "
      f"{'—' if d is None else ('yes' if d <= 8 else '**no**')} |")
d = med(idle, ("streams", "entry", "wsgate-nothp"))
if d is not None:
    print(f"| (d) the same, mimalloc without transparent huge pages | {fmt(d, '{:.1f} KiB')} | "
          f"{'yes' if d <= 8 else '**no**'} |")

# ---------------------------------------------------------------- (e)
print()
print("(e) HTTP GET of a 6-byte answer from nginx, 16 client connections (keep-alive unless said):")
print()
print("| path | requests/s | ÷ direct |")
print("|---|---:|---:|")
direct = med(vals, ("http", "HTTP_DIRECT"))
for h, label in (("HTTP_DIRECT", "nginx directly"),
                 ("HTTP_DIRECT_CLOSE", "nginx directly, a new connection per request (`Connection: close`)"),
                 ("HTTP_REQUEST", "wsgate `/request` (X-PROXY-DESTINATION) → agent → nginx"),
                 ("HTTP_PROXY", "wsgate forward proxy (`curl -x` style) → agent → nginx")):
    v = med(vals, ("http", h))
    e = errors.get(("http", h), 0)
    print(f"| {label} | {fmt(v, '{:.0f}')}{f' ({e} errors)' if e else ''} | "
          f"{fmt(v / direct if v and direct else None, '{:.2f}')} |")

# ---------------------------------------------------------------- CPU
print()
print("CPU per unit of work (user + system, entry side + exit side, over warm-up + measured time):")
print()
print("| test | " + " | ".join(c for c in CONTENDERS if c != "direct") + " |")
print("|---|" + "---:|" * (len(CONTENDERS) - 1))
tick = 1e6 / os.sysconf("SC_CLK_TCK")
for t, label, unit, scale in (("throughput", "(a) µs per MB echoed", "MB", 1.0),
                              ("connections", "(b) µs per connection", "conn", 1.0)):
    cells = []
    for c in CONTENDERS:
        if c == "direct":
            continue
        xs = [((e + x) * tick) / (v * (float(dur) + float(warm)))
              for v, e, x in cpu.get((t, c), []) if v]
        cells.append(fmt(statistics.median(xs) if xs else None, "{:.0f}"))
    print(f"| {label} | " + " | ".join(cells) + " |")
