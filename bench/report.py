"""The run's outputs: ``result.json``, ``result.png``, the console summary and one line of
the runs table in ``docs/performance.md``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import orjson

from bench.config import PERFORMANCE_DOC, ROOT

log = logging.getLogger("bench")

RUNS_HEADING = "## Runs"
RUNS_HEADER = (
    "| date (UTC) | commit | label | workers | K | A | OTP | partitions | measured s "
    "| transfers/s | init p50 / p99 ms | confirm→final p50 / p95 / p99 / max ms "
    "| errors | echo round trips/s | ratio per transfer | ratio per request | money "
    "| cores busy (other) | results |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def doc_line(result: dict[str, Any]) -> str:
    cfg, figures = result["settings"], result["figures"]
    init, final = figures["latency"]["transferInit"], figures["latency"]["confirmToFinal"]
    echo = figures.get("echo") or {}
    cpu = figures.get("cpu") or {}
    errors = figures["errorsInWindow"]
    error_text = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"
    try:
        where = str(Path(result["outputDir"]).relative_to(ROOT))
    except ValueError:
        where = result["outputDir"]
    cells = [
        result["startedAt"][:16].replace("T", " "),
        result["machine"]["gitCommit"],
        cfg.get("label") or "",
        cfg["workers"], cfg["users"], cfg["accounts"], f"{cfg['otp_share']:.0%}",
        cfg["partitions"], _fmt(figures["measuredSeconds"], 1),
        _fmt(figures["completedPerSecond"], 1),
        f"{_fmt(init.get('p50Ms'), 1)} / {_fmt(init.get('p99Ms'), 1)}",
        " / ".join(_fmt(final.get(k), 1) for k in ("p50Ms", "p95Ms", "p99Ms", "maxMs")),
        error_text,
        _fmt(echo.get("roundTripsPerSecond"), 0) if echo else "skipped",
        _fmt(figures.get("ratioPerTransfer"), 3),
        _fmt(figures.get("ratioPerRequest"), 3),
        "ok" if result["checks"]["passed"] else "**FAILED**",
        f"{cpu['coresBusy']:.2f} ({cpu['coresOther']:.2f})" if cpu else "-",
        f"`{where}`",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def append_doc_line(result: dict[str, Any], doc: Path = PERFORMANCE_DOC) -> None:
    """Add the run to the table under ``## Runs`` (created when missing)."""
    line = doc_line(result)
    text = doc.read_text() if doc.exists() else "# Performance\n"
    lines = text.splitlines(keepends=True)
    try:
        heading = next(i for i, ln in enumerate(lines) if ln.strip() == RUNS_HEADING)
    except StopIteration:
        if not text.endswith("\n"):
            text += "\n"
        doc.write_text(f"{text}\n{RUNS_HEADING}\n\n{RUNS_HEADER}{line}")
        return
    end = len(lines)
    for i in range(heading + 1, len(lines)):
        if lines[i].startswith("#"):
            end = i
            break
    last_row = max((i for i in range(heading + 1, end) if lines[i].startswith("|")),
                   default=None)
    if last_row is None:
        lines[heading + 1:heading + 1] = ["\n", RUNS_HEADER, line]
    else:
        lines.insert(last_row + 1, line)
    doc.write_text("".join(lines))


# ---------------------------------------------------------------------------- console


def _interpreter_line(machine: dict[str, Any]) -> list[str]:
    """The interpreter every process of the run ran on (bench/machine.py ``python_build``):
    a figure is comparable only with runs on the same build."""
    build = machine.get("pythonBuild")
    if not build:
        return []
    return [f"  python {build['version']}, {build['executable']}, "
            f"libpython {build['libpython']}"]


def console_summary(result: dict[str, Any]) -> str:
    f = result["figures"]
    out = [
        "",
        f"bizcenter benchmark {result['runId']} → {result['outputDir']}",
        f"  {result['settings']['workers']} worker(s), K={result['settings']['users']} "
        f"virtual users, A={result['settings']['accounts']} accounts, "
        f"OTP share {result['settings']['otp_share']:.0%}, "
        f"{result['settings']['partitions']} partitions",
        *_interpreter_line(result.get("machine", {})),
        f"  completed transfers/s      {f['completedPerSecond']:.1f}   "
        f"({f['completedInWindow']} in {f['measuredSeconds']:.1f} s; "
        f"gateway requests/s {f['requestsPerSecond']:.1f})",
    ]
    for name, label in (("transferInit", "transferInit → reply"),
                        ("confirmToFinal", "confirm (or verifyOtp) → final"),
                        ("confirmToFinalNoOtp", "  without OTP: confirm → final"),
                        ("verifyOtpToFinal", "  with OTP: verifyOtp → final"),
                        ("wholeTransfer", "whole transfer")):
        s = f["latency"].get(name) or {}
        if s.get("count"):
            out.append(f"  {label:<31} p50 {s['p50Ms']:7.1f}  p95 {s['p95Ms']:7.1f}  "
                       f"p99 {s['p99Ms']:7.1f}  max {s['maxMs']:7.1f} ms  (n={s['count']})")
    hop_figures = (f.get("hops") or {}).get("hopsMs") or {}
    if hop_figures:
        out.append(f"  confirm → final by hop (record timestamps, {f['hops']['transfers']} "
                   "transfers without OTP):")
        for name, s in hop_figures.items():
            out.append(f"    {name:<44} p50 {s['p50']:6.1f}  p90 {s['p90']:6.1f}  "
                       f"mean {s['mean']:6.1f} ms  ({s['shareOfMean']:.0%})")
    errors = f["errorsInWindow"]
    out.append("  errors in the window        " + (", ".join(
        f"{k}: {v}" for k, v in sorted(errors.items())) or "none"))
    echo = f.get("echo")
    if echo:
        lat = echo["latency"]
        out.append(f"  echo ceiling               {echo['roundTripsPerSecond']:.1f} round trips/s"
                   f"  p50 {lat.get('p50Ms', math.nan):.1f}  p99 {lat.get('p99Ms', math.nan):.1f}"
                   " ms")
        out.append(f"  ratio per transfer         {f['ratioPerTransfer']:.3f}   "
                   f"ratio per request {f['ratioPerRequest']:.3f}")
    cpu = f.get("cpu") or {}
    if cpu:
        procs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
            cpu["coresByProcess"].items(), key=lambda kv: -kv[1]))
        out.append(f"  cores busy {cpu['coresBusy']:.2f} of {cpu['coresTotal']:.0f}: {procs}, "
                   f"other {cpu['coresOther']:.2f} (stolen {cpu.get('coresStolen', 0.0):.2f})")
        waits = cpu.get("runqueueWaitByProcess") or {}
        if waits:
            out.append("  waiting for a core (s/s)  " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(waits.items(), key=lambda kv: -kv[1])))
    checks = result["checks"]
    out.append("  checks: " + ("all passed" if checks["passed"] else "FAILED"))
    for item in checks["items"]:
        out.append(f"    [{'ok' if item['ok'] else 'FAIL'}] {item['name']}: {item['detail']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- PNG


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_png(path: Path, result: dict[str, Any], series: dict[str, Any]) -> bool:
    """Latency CDFs and histograms, throughput per second, CPU by process."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG (pip install -e '.[dev]')")
        return False

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    f, cfg = result["figures"], result["settings"]
    fig.suptitle(
        f"bizcenter: {cfg['workers']} worker(s), K={cfg['users']}, A={cfg['accounts']}, "
        f"OTP {cfg['otp_share']:.0%}, {cfg['partitions']} partitions — "
        f"{f['completedPerSecond']:.0f} transfers/s"
        + (f", echo {f['echo']['roundTripsPerSecond']:.0f} round trips/s" if f.get("echo")
           else "")
        + f" ({result['startedAt'][:16]}Z, {result['machine']['gitCommit']})")

    curves = [("transferInit → reply", series["init"]),
              ("confirm → final (no OTP)", series["finalNoOtp"]),
              ("verifyOtp → final (OTP)", series["finalOtp"]),
              ("echo round trip", series.get("echo") or [])]
    ax = axes[0][0]
    for label, values in curves:
        if values:
            ordered = sorted(1000 * v for v in values)
            n = len(ordered)
            ax.plot(ordered, [(i + 1) / n for i in range(n)], label=f"{label} (n={n})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title("Latency CDF (measured window)")
    for q in (0.5, 0.95, 0.99):
        ax.axhline(q, color="grey", linewidth=0.5, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)

    ax = axes[0][1]
    values = [1000 * v for _, vs in curves[:3] for v in vs]
    if values:
        low, high = max(0.1, min(values)), max(values)
        bins = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 10
        for label, vs in curves[:3]:
            if vs:
                ax.hist([1000 * v for v in vs], bins=bins, histtype="step", label=label)
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("requests")
    ax.set_title("Latency histogram (measured window)")
    _legend(ax)

    ax = axes[1][0]
    per_second = series["completedPerSecond"]
    ax.plot(range(len(per_second)), per_second, label="completed transfers/s")
    ax.axvspan(0, cfg["warmup"], color="orange", alpha=0.15, label="warm-up")
    ax.axhline(f["completedPerSecond"], color="C0", linestyle="--", linewidth=0.8,
               label=f"mean over the window: {f['completedPerSecond']:.0f}/s")
    ax.set_xlabel("seconds since the first transfer")
    ax.set_ylabel("per second")
    ax.set_title("Throughput over time")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    _legend(ax)

    ax = axes[1][1]
    cpu = f.get("cpu") or {}
    procs = sorted((cpu.get("coresByProcess") or {}).items(), key=lambda kv: -kv[1])
    if procs:
        procs.append(("other (not this run)", cpu.get("coresOther", 0.0)))
        ax.barh([p[0] for p in procs], [p[1] for p in procs], color="C2")
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel(f"cores (machine: {cpu.get('coresTotal', 0):.0f}; "
                      f"busy {cpu.get('coresBusy', 0):.2f})")
        ax.set_title("CPU by process (measured window)")
    else:
        ax.set_axis_off()

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
