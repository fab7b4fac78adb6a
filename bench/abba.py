"""``python -m bench.abba``: two versions of the system, the same benchmark, in ABBA order.

This machine's speed drifts by a third within minutes (docs/performance.md, session 25: the
same code at 350 and at 700 transfers/s in two sittings), so a change is priced only
against a baseline measured in the same sitting, in the order A B B A per round (a drift
during the round weighs on both sides alike), and by figures that the drift moves less:

- CPU per transfer by process (ms), and over every process of the system (the workers,
  PostgreSQL, Kafka, the account center: ``all``);
- ``all`` divided by the load generator's CPU per transfer (``normalized``): the load
  generator's code is the same on both sides, so its cost per transfer measures the
  machine's moment; a change that saves CPU lowers ``normalized`` whatever the sitting;
- transfers/s and confirm → final p99, which the drift moves most.

Each side is a git revision (checked out into a temporary worktree, removed at the end)
or a directory (``.``: the working tree, uncommitted changes included). Every run is one
``python -m bench`` of that side's code (``PYTHONPATH``: the side's directory, as the
benchmark's own child processes are), with the broker and the database of ``make up``
(the ``.local/env`` of this checkout, copied into a side that has none, worktree or
directory), ``--no-doc`` (no line is added to docs/performance.md), the echo skipped.
Exit 0 when every run's checks passed, 1 otherwise, 2 on bad arguments (a side that is
neither a directory nor a revision).

    python -m bench.abba --a HEAD~1 --b . -k 512 --duration 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import ROOT

LOAD_GENERATOR = "bench (load generator)"


def plan(rounds: int) -> list[tuple[str, int]]:
    """The runs in order: per round ``a b b a`` (the second of a side numbered +100)."""
    return [(side, number) for i in range(1, rounds + 1)
            for side, number in (("a", i), ("b", i), ("b", i + 100), ("a", i + 100))]


@dataclass(frozen=True)
class RunFigures:
    """What one run (its ``result.json``) says, per transfer."""

    label: str
    transfers_per_second: float
    ms_by_process: dict[str, float]  # CPU per transfer; the load generator apart
    load_generator_ms: float
    p99_ms: float
    passed: bool

    @property
    def all_ms(self) -> float:
        return sum(self.ms_by_process.values())

    @property
    def normalized(self) -> float:
        return self.all_ms / self.load_generator_ms if self.load_generator_ms else 0.0


def figures_of(result: dict[str, Any]) -> RunFigures:
    figures = result["figures"]
    rate = float(figures["completedPerSecond"])
    cores = (figures.get("cpu") or {}).get("coresByProcess") or {}
    ms = {name: 1000 * c / rate for name, c in cores.items()} if rate else {}
    return RunFigures(
        label=result["settings"].get("label") or "",
        transfers_per_second=rate,
        ms_by_process={n: v for n, v in ms.items() if n != LOAD_GENERATOR},
        load_generator_ms=ms.get(LOAD_GENERATOR, 0.0),
        p99_ms=float(figures["latency"]["confirmToFinal"].get("p99Ms") or 0.0),
        passed=bool(result["checks"]["passed"]),
    )


def side_summary(runs: Sequence[RunFigures]) -> dict[str, Any]:
    """The means of one side's runs; the processes' CPU per transfer summed by kind (two
    workers are one ``worker``)."""
    by_kind: dict[str, list[float]] = {}
    for run in runs:
        kinds: dict[str, float] = {}
        for name, ms in run.ms_by_process.items():
            kind = "worker" if name.startswith("worker") else name
            kinds[kind] = kinds.get(kind, 0.0) + ms
        for kind, ms in kinds.items():
            by_kind.setdefault(kind, []).append(ms)
    return {
        "runs": len(runs),
        "transfersPerSecond": statistics.fmean(r.transfers_per_second for r in runs),
        "allMs": statistics.fmean(r.all_ms for r in runs),
        "normalized": statistics.fmean(r.normalized for r in runs),
        "p99Ms": statistics.fmean(r.p99_ms for r in runs),
        "msByProcess": {k: statistics.fmean(v) for k, v in sorted(by_kind.items())},
        "passed": all(r.passed for r in runs),
    }


def compare(a: Sequence[RunFigures], b: Sequence[RunFigures]) -> dict[str, Any]:
    """Both sides' summaries and B against A (ratios: below 1, B costs less or is slower)."""
    sa, sb = side_summary(a), side_summary(b)
    return {"a": sa, "b": sb, "bOverA": {
        key: sb[key] / sa[key] if sa[key] else None
        for key in ("transfersPerSecond", "allMs", "normalized", "p99Ms")}}


def report_lines(runs: Iterable[RunFigures], comparison: dict[str, Any]) -> Iterator[str]:
    for r in runs:
        per = " ".join(f"{k} {v:.2f}" for k, v in sorted(r.ms_by_process.items()))
        yield (f"{r.label:>14} {r.transfers_per_second:8.1f}/s  all {r.all_ms:.2f} ms "
               f"({per})  load generator {r.load_generator_ms:.3f}  normalized "
               f"{r.normalized:.2f}  p99 {r.p99_ms:.0f} ms  "
               f"{'ok' if r.passed else 'CHECKS FAILED'}")
    for side in ("a", "b"):
        s = comparison[side]
        per = " ".join(f"{k} {v:.2f}" for k, v in s["msByProcess"].items())
        yield (f"{side}: {s['runs']} runs, {s['transfersPerSecond']:.1f}/s, all "
               f"{s['allMs']:.2f} ms ({per}), normalized {s['normalized']:.2f}, p99 "
               f"{s['p99Ms']:.0f} ms")
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in comparison["bOverA"].items()
                       if v is not None)
    yield f"b / a: {ratios}"


# --- running -------------------------------------------------------------------------


def _side_dir(spec: str, workdir: Path, name: str) -> tuple[Path, bool]:
    """The directory of a side: an existing directory as it is, else a worktree of the
    revision (True: to be removed)."""
    path = Path(spec)
    if path.is_dir():
        return path.resolve(), False
    target = workdir / name
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach",
                    str(target), spec], check=True, capture_output=True)
    return target, True


def _ensure_env(side: Path) -> None:
    """The side's ``.local/env`` (the benchmark reads its settings there): this checkout's."""
    env = side / ".local" / "env"
    if not env.exists() and (ROOT / ".local" / "env").exists():
        env.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / ".local" / "env", env)


def run_one(side: Path, label: str, output: Path, bench_args: Sequence[str]) -> Path | None:
    """One benchmark of ``side``'s code; its ``result.json`` (None: none written)."""
    before = set(output.glob("*/result.json"))
    env = {**os.environ, "PYTHONPATH": str(side), "BIZ_ENVIRONMENT": "development"}
    with open(output / f"{label}.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "bench", *bench_args, "--no-doc",
                        "--skip-echo", "--label", label, "--output-dir", str(output)],
                       cwd=side, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    new = sorted(set(output.glob("*/result.json")) - before)
    return new[-1] if new else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abba", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="HEAD", help="side A: a git revision or a directory")
    p.add_argument("--b", default=".", help="side B: a git revision or a directory")
    p.add_argument("--rounds", type=int, default=2, help="rounds of A B B A")
    p.add_argument("-k", "--users", type=int, default=512)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--workers", type=int, choices=(1, 2), default=1)
    p.add_argument("--tag", default="abba", help="the runs' labels: <tag>-<side><n>")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the runs go (default: a new temporary directory)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    output = args.output_dir or Path(tempfile.mkdtemp(prefix="bench-abba-"))
    output.mkdir(parents=True, exist_ok=True)
    bench_args = ["-k", str(args.users), "--duration", str(args.duration),
                  "--warmup", str(args.warmup), "--workers", str(args.workers)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-abba-sides-"))
    made: list[Path] = []
    runs: dict[str, list[RunFigures]] = {"a": [], "b": []}
    ordered: list[RunFigures] = []
    missing = 0
    try:
        sides = {}
        for name, spec in (("a", args.a), ("b", args.b)):
            try:
                sides[name], created = _side_dir(spec, workdir, name)
            except subprocess.CalledProcessError as exc:
                print(f"--{name} {spec!r} is neither a directory nor a revision: "
                      f"{exc.stderr.decode(errors='replace').strip()}", file=sys.stderr)
                return 2
            if created:
                made.append(sides[name])
            _ensure_env(sides[name])
        for side, number in plan(args.rounds):
            label = f"{args.tag}-{side}{number}"
            print(f"run {label} ({sides[side]})", flush=True)
            result = run_one(sides[side], label, output, bench_args)
            if result is None:
                missing += 1
                print(f"  {label}: no result (see {output / (label + '.log')})", flush=True)
                continue
            figures = figures_of(json.loads(result.read_text()))
            runs[side].append(figures)
            ordered.append(figures)
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(path)], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if not runs["a"] or not runs["b"]:
        print("no comparison: a side has no result", file=sys.stderr)
        return 1
    comparison = compare(runs["a"], runs["b"])
    for line in report_lines(ordered, comparison):
        print(line)
    (output / "abba.json").write_text(json.dumps(comparison, indent=1))
    print(f"results: {output}")
    return 0 if missing == 0 and all(r.passed for r in ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
