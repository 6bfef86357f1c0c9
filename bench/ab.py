#!/usr/bin/env python3
"""Side-by-side A/B of already running servers: rate, CPU and context switches per unit of work.

    bench/ab.py [--rounds N] [--warmup S] [--duration S] TEST NAME=PORT:PID[,PID...] ...

TEST is one of `e` (handshakes, 8 loops), `b1` / `b50` (64 B messages, 16 in
flight, 1 / 50 connections) or `a` (64 KiB throughput). Each NAME is a server
listening on 127.0.0.1:PORT whose CPU time is read from /proc/PID/stat (list
every process of it: nginx's master and workers). Round after round, the
targets run one after the other (the order rotates), and for each the median
over rounds of the rate and of the user and system CPU per unit of work (µs
per handshake, message or byte) is printed.

Meant for comparing two builds of the gateway, or one flag against another,
on a machine whose speed drifts: the CPU per unit moves much less than the
rate does. `bench/proxy.sh` is the benchmark of record; this is the quick
tool for deciding whether a change helps (see bench/proxy/README.md).
"""
import argparse
import os
import statistics
import subprocess
import sys

TESTS = {
    "e": "--test handshakes --conns 8 --size 64",
    "b1": "--test messages --conns 1 --size 64 --inflight 16",
    "b50": "--test messages --conns 50 --size 64 --inflight 16",
    "a": "--test throughput --size 65536 --window 4",
}
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def ticks(pids):
    """User and system clock ticks used so far by the processes `pids`."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def oncpu_ns(pids):
    """Nanoseconds on a CPU so far (user and system together) of every thread
    of the processes `pids`, from the scheduler's own accounting: precise
    where the clock ticks above are 10 ms coarse."""
    total = 0
    for pid in pids:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                pass  # a thread that has just ended
    return total


def switches(pids):
    """Context switches so far (voluntary and not) of every thread of the
    processes `pids`: on a VM each costs microseconds of wake-up, often more
    than the work between two."""
    total = 0
    for pid in pids:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
            except FileNotFoundError:
                pass  # a thread that has just ended
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--duration", type=float, default=1.2)
    p.add_argument("--wsbench", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "wsbench"))
    p.add_argument("test", choices=sorted(TESTS))
    p.add_argument("targets", nargs="+", metavar="NAME=PORT:PID[,PID...]")
    a = p.parse_args()
    if not os.access(a.wsbench, os.X_OK):
        p.error(f"no wsbench at {a.wsbench}: cargo build --release -p wsgate-bench, or --wsbench PATH")
    targets = []
    for t in a.targets:
        name, _, rest = t.partition("=")
        port, _, pids = rest.partition(":")
        if not (name and port.isdigit() and pids):
            p.error(f"bad target {t!r}: expected NAME=PORT:PID[,PID...]")
        targets.append((name, port, pids.split(",")))
    results = {name: [] for name, _, _ in targets}
    for r in range(a.rounds):
        k = r % len(targets)
        for name, port, pids in targets[k:] + targets[:k]:
            u0, s0 = ticks(pids)
            c0 = oncpu_ns(pids)
            x0 = switches(pids)
            out = subprocess.run(
                [a.wsbench, "load", "--target", f"ws://127.0.0.1:{port}/", *TESTS[a.test].split(),
                 "--warmup", str(a.warmup), "--duration", str(a.duration)],
                capture_output=True, text=True, check=False,
            )
            u1, s1 = ticks(pids)
            c1 = oncpu_ns(pids)
            x1 = switches(pids)
            try:
                rate = float(out.stdout.split()[0])
            except (IndexError, ValueError):
                sys.exit(f"ab.py: {name}: wsbench failed: {out.stdout}{out.stderr}")
            # CPU during warm-up and measurement, over the work done in both.
            units = rate * (a.warmup + a.duration)
            results[name].append(
                (rate, (u1 - u0) * TICK_US / units, (s1 - s0) * TICK_US / units, (c1 - c0) / 1e3 / units,
                 (x1 - x0) / units)
            )
    print(
        f"{a.test}: medians of {a.rounds} rounds; CPU in µs per unit: user and sys from clock ticks "
        f"(±1 tick of {TICK_US:.0f} µs per cell), oncpu from the scheduler's ns counters; context switches per unit"
    )
    for name, v in results.items():
        med = lambda i: statistics.median(x[i] for x in v)  # noqa: E731
        total = statistics.median(x[1] + x[2] for x in v)
        print(
            f"  {name:10s} rate {med(0):12.0f}  user {med(1):8.3f}  sys {med(2):8.3f}  total {total:8.3f}"
            f"  oncpu {med(3):8.3f}  switches {med(4):6.3f}"
        )


if __name__ == "__main__":
    main()
