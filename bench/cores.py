"""What the machine's second core is worth: ``python -m bench.cores``.

The same fixed piece of pure-Python work (a loop of integer arithmetic, one process, one
thread) is run alone, then twice at once, in alternation (``--rounds``): each run
reports the CPU seconds its work took (``time.process_time``). On a machine whose cores
are independent, the work costs the same CPU alone and two at a time; on a virtual
machine whose two vCPUs share a physical core (hyper-threads) or a host busy with other
guests, it costs more when both run, and CPU per transfer measured with both cores busy
(two workers, or one worker with PostgreSQL, Kafka and the load beside it) rises for the
same code. ``worth`` = 2 ÷ (CPU together ÷ CPU alone): what two busy cores do, counted in
cores running alone (2.0 when independent). ``aloneSpread`` = the slowest run alone ÷ the
fastest: how much the machine's own speed moved during the measurement (1.0 on a quiet
machine; on this benchmark's virtual machine it was ~1.9, runs falling into a fast and a
slow state, docs/performance.md). ``togetherWallOverCpu`` = each copy's elapsed time ÷ its
CPU time when two run at once: ~1.0 when each had a core of its own; toward 2.0 when they
took turns on one (a quota, a pinned CPU set), and then ``worth`` means nothing. The probe
refuses to run where this process may use fewer than two CPUs.

Read it beside a benchmark run, in the same sitting: the machine's moment moves both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

#: The child: the work, then its CPU seconds and its elapsed seconds on stdout.
WORK = """
import sys, time
n = int(sys.argv[1])
start, wall = time.process_time(), time.perf_counter()
x = 0
for i in range(n):
    x += i * i % 7
print(time.process_time() - start, time.perf_counter() - wall)
"""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_at_once(copies: int, iterations: int) -> list[tuple[float, float]]:
    """``copies`` processes started together, each doing the work once: their CPU and
    elapsed seconds. Every child is waited for, even after one failed."""
    procs = [subprocess.Popen([sys.executable, "-c", WORK, str(iterations)],
                              stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    outs = [(proc.communicate()[0], proc.returncode) for proc in procs]
    failed = [rc for _out, rc in outs if rc != 0]
    if failed:
        raise RuntimeError(f"the work exited {failed[0]}")
    runs = []
    for out, _rc in outs:
        cpu, wall = out.split()
        runs.append((float(cpu), float(wall)))
    return runs


def summarize(alone: Sequence[float], together: Sequence[float],
              together_wall: Sequence[float] = ()) -> dict[str, Any]:
    """Medians of the CPU seconds of the work alone and two at once, their ratio, what two
    busy cores are worth in cores running alone, and (given the elapsed seconds of the
    runs together) how much longer than their CPU time those took."""
    if not alone or not together:
        raise ValueError("no runs")
    if together_wall and len(together_wall) != len(together):
        raise ValueError("one elapsed time per run together")
    a = statistics.median(alone)
    t = statistics.median(together)
    ratio = t / a
    figures: dict[str, Any] = {
        "aloneSeconds": round(a, 3), "togetherSeconds": round(t, 3),
        "togetherOverAlone": round(ratio, 3), "worth": round(2 / ratio, 2),
        "aloneSpread": round(max(alone) / min(alone), 2),
        "alone": [round(s, 3) for s in alone],
        "together": [round(s, 3) for s in together]}
    if together_wall:
        figures["togetherWallOverCpu"] = round(statistics.median(
            w / c for w, c in zip(together_wall, together, strict=True)), 2)
    return figures


def measure(rounds: int, iterations: int) -> dict[str, Any]:
    alone: list[float] = []
    together: list[tuple[float, float]] = []
    for _ in range(rounds):
        alone.extend(cpu for cpu, _wall in run_at_once(1, iterations))
        together.extend(run_at_once(2, iterations))
    return summarize(alone, [cpu for cpu, _ in together], [wall for _, wall in together])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alone, then two at once, this "
                   "many times (default %(default)s)")
    p.add_argument("--iterations", type=int, default=10_000_000,
                   help="the work's loop length (default %(default)s: ~1.5 s alone)")
    p.add_argument("--json", action="store_true", help="the figures as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1:
        p.error("--rounds and --iterations must be positive")
    if usable_cpus() < 2:
        p.error(f"this process may use {usable_cpus()} CPU: two copies would take turns on "
                "it, and what a second core is worth cannot be measured")
    figures = measure(args.rounds, args.iterations)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"the work alone: {figures['aloneSeconds']} s of CPU (runs {figures['alone']})")
        print(f"two at once:    {figures['togetherSeconds']} s of CPU each "
              f"(runs {figures['together']})")
        print(f"together / alone {figures['togetherOverAlone']}: two busy cores are worth "
              f"{figures['worth']} cores running alone (each took "
              f"{figures['togetherWallOverCpu']} times its CPU time: ~1 when each had a "
              "core)")
        print(f"the same work alone took up to {figures['aloneSpread']} times its fastest "
              "run: the machine's own speed moved that much")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
