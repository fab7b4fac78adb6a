"""bench/abba.py: two versions compared in ABBA order, per transfer and normalized by the
load generator's CPU (the benchmark itself is replaced by results written here: the
figures and the order are what is tested; `python -m bench.abba` runs the real one)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bench import abba


def result(label: str, rate: float, cores: dict[str, float], *, p99: float = 200.0,
           passed: bool = True) -> dict[str, Any]:
    """A ``result.json`` as ``python -m bench`` writes it (the fields read)."""
    return {"settings": {"label": label},
            "checks": {"passed": passed},
            "figures": {"completedPerSecond": rate,
                        "cpu": {"coresByProcess": cores},
                        "latency": {"confirmToFinal": {"p99Ms": p99}}}}


CORES = {"worker-0": 0.6, "postgres": 0.3, "kafka": 0.1, "account-center": 0.1,
         abba.LOAD_GENERATOR: 0.1}


def test_the_runs_go_a_b_b_a_round_after_round() -> None:
    assert abba.plan(2) == [("a", 1), ("b", 1), ("b", 101), ("a", 101),
                            ("a", 2), ("b", 2), ("b", 102), ("a", 102)]


def test_a_run_is_read_per_transfer_with_the_load_generator_apart() -> None:
    run = abba.figures_of(result("t-a1", 500.0, CORES, p99=180.0))
    assert run.ms_by_process == pytest.approx(
        {"worker-0": 1.2, "postgres": 0.6, "kafka": 0.2, "account-center": 0.2})
    assert run.load_generator_ms == pytest.approx(0.2)
    assert run.all_ms == pytest.approx(2.2)
    assert run.normalized == pytest.approx(11.0)
    assert (run.label, run.p99_ms, run.passed) == ("t-a1", 180.0, True)


def test_a_run_without_transfers_or_cpu_figures_has_no_costs() -> None:
    run = abba.figures_of(result("t-a1", 0.0, CORES))
    assert run.ms_by_process == {} and run.all_ms == 0.0 and run.normalized == 0.0


def test_two_workers_count_as_one_worker_and_b_is_priced_against_a() -> None:
    two = {**CORES, "worker-0": 0.3, "worker-1": 0.3}
    a = [abba.figures_of(result("a1", 500.0, two)), abba.figures_of(result("a101", 400.0, two))]
    cheaper = {**two, "worker-0": 0.2, "worker-1": 0.2}  # the same rate, less CPU
    b = [abba.figures_of(result("b1", 500.0, cheaper)),
         abba.figures_of(result("b101", 400.0, cheaper))]
    comparison = abba.compare(a, b)
    assert comparison["a"]["msByProcess"]["worker"] == pytest.approx((1.2 + 1.5) / 2)
    assert comparison["b"]["msByProcess"]["worker"] == pytest.approx((0.8 + 1.0) / 2)
    assert comparison["bOverA"]["transfersPerSecond"] == pytest.approx(1.0)
    # all: a 2.2 and 2.75 ms, b 1.8 and 2.25 ms
    assert comparison["bOverA"]["allMs"] == pytest.approx((1.8 + 2.25) / (2.2 + 2.75))
    assert comparison["a"]["passed"] and comparison["b"]["passed"]


def _fake_bench(calls: list[str], costs: dict[str, float], failing: str | None = None) -> Any:
    """``run_one`` replaced: a result.json per run, side B's worker costing ``costs['b']``
    cores against A's ``costs['a']`` at the same rate."""
    def run_one(side: Path, label: str, output: Path, bench_args: Sequence[str]) -> Path:
        calls.append(label)
        cores = {**CORES, "worker-0": costs[label.split("-")[-1][0]]}
        path = output / label / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(result(label, 500.0, cores, passed=label != failing)))
        return path
    return run_one


def test_the_comparison_runs_every_run_in_order_and_writes_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(abba, "run_one", _fake_bench(calls, {"a": 0.6, "b": 0.4}))
    side_a, side_b = tmp_path / "a", tmp_path / "b"
    side_a.mkdir()
    side_b.mkdir()
    out = tmp_path / "out"
    code = abba.main(["--a", str(side_a), "--b", str(side_b), "--rounds", "2",
                      "--tag", "t", "--output-dir", str(out)])
    assert code == 0
    assert calls == [f"t-{side}{n}" for side, n in abba.plan(2)]
    written = json.loads((out / "abba.json").read_text())
    # a: 1.2 + 0.6 + 0.2 + 0.2 = 2.2 ms; b: 0.8 + 1.0 = 1.8 ms
    assert written["bOverA"]["allMs"] == pytest.approx(1.8 / 2.2)
    assert written["bOverA"]["normalized"] == pytest.approx(1.8 / 2.2)
    assert "b / a:" in capsys.readouterr().out


def test_a_run_whose_checks_failed_fails_the_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(abba, "run_one", _fake_bench(calls, {"a": 0.6, "b": 0.6}, "t-b101"))
    code = abba.main(["--a", str(tmp_path), "--b", str(tmp_path), "--rounds", "1",
                      "--tag", "t", "--output-dir", str(tmp_path / "out")])
    assert code == 1 and len(calls) == 4


def test_rounds_below_one_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_info:
        abba.main(["--rounds", "0"])
    assert exit_info.value.code == 2


def test_a_side_that_is_neither_a_directory_nor_a_revision_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(abba, "run_one", _fake_bench(calls, {"a": 0.6, "b": 0.6}))
    code = abba.main(["--a", "no-such-revision-of-this-repository", "--b", str(tmp_path),
                      "--rounds", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and calls == []
    assert "neither a directory nor a revision" in capsys.readouterr().err
