"""bench/cores.py: what the machine's second core is worth (the figures from given CPU
seconds; the real probe once, with a tiny piece of work)."""

from __future__ import annotations

import json

import pytest

from bench import cores


def test_summarize_medians_ratio_worth_and_spread() -> None:
    figures = cores.summarize([1.0, 2.0, 1.2], [1.5, 1.5, 1.8, 1.4, 1.5, 1.6])
    assert figures["aloneSeconds"] == 1.2
    assert figures["togetherSeconds"] == 1.5
    assert figures["togetherOverAlone"] == 1.25
    assert figures["worth"] == 1.6  # 2 / 1.25
    assert figures["aloneSpread"] == 2.0


def test_independent_cores_are_worth_two() -> None:
    assert cores.summarize([1.0], [1.0, 1.0])["worth"] == 2.0


def test_no_runs_refused() -> None:
    with pytest.raises(ValueError):
        cores.summarize([], [1.0])
    with pytest.raises(ValueError):
        cores.summarize([1.0], [1.0, 1.0], [1.0])


def test_turns_on_one_core_show_in_the_elapsed_time() -> None:
    """Two copies taking turns on one CPU each take twice their CPU time in elapsed time:
    the figure that says ``worth`` is meaningless."""
    assert cores.summarize([1.0], [1.0, 1.0], [2.0, 2.1])["togetherWallOverCpu"] == 2.05
    assert cores.summarize([1.0], [1.0, 1.2], [1.0, 1.2])["togetherWallOverCpu"] == 1.0


def test_one_usable_cpu_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "usable_cpus", lambda: 1)
    with pytest.raises(SystemExit) as exc:
        cores.main(["--rounds", "1", "--iterations", "1000"])
    assert exc.value.code == 2


def test_every_child_waited_for_when_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "WORK", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match="exited 3"):
        cores.run_at_once(2, 1)


def test_the_probe_runs_the_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert cores.main(["--rounds", "1", "--iterations", "300000", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert len(figures["alone"]) == 1
    assert len(figures["together"]) == 2
    assert figures["aloneSeconds"] > 0 and figures["togetherSeconds"] > 0
    assert figures["togetherWallOverCpu"] > 0


def test_bad_arguments_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        cores.main(["--rounds", "0"])
    assert exc.value.code == 2
