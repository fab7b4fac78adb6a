"""Sampling profiles of the worker(s) and the account center during the measured window
(``--profile``), with py-spy (``pip install py-spy``; not a project dependency).

py-spy attaches to the running process (``--nonblocking``: the process is never paused) and
writes collapsed stacks (``<name>.collapsed``, one ``frame;frame;... count`` line per
stack: load it into speedscope or inferno/flamegraph.pl). The summary ranks functions by
the share of samples in which they are on the stack (inclusive) and at its top (self).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Top frames that only mean "waiting" (py-spy leaves idle threads out unless --idle).
IDLE = re.compile(r"^(\w+\.)?(select|poll|epoll_wait) \(")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    name: str
    pid: int
    output: Path
    process: subprocess.Popen[bytes]
    log: Path
    rate: int
    seconds: float


def start(name: str, pid: int, duration: float, rate: int, out_dir: Path) -> Recording:
    exe = py_spy()
    if exe is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.collapsed"
    log = out_dir / f"{name}.py-spy.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration))),
             "--rate", str(rate), "--format", "raw", "--nonblocking", "--threads",
             "--output", str(output)],
            stdout=err, stderr=subprocess.STDOUT)
    return Recording(name, pid, output, proc, log, rate, max(1, int(duration)))


def finish(rec: Recording, timeout: float = 60.0) -> dict[str, Any]:
    try:
        rec.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rec.process.terminate()
        rec.process.wait()
    if not rec.output.exists():
        return {"error": f"no profile written; see {rec.log}"}
    return summarize(rec.output, rec.rate, rec.seconds)


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``name (file.py)``: one entry per function."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    name, path = match.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


#: Top-level names of this project's code in py-spy's frame paths.
OURS = ("app", "agents", "events", "schemas", "bench")


def _package(frame: str) -> str:
    """Where a frame's code lives: a library (its top-level package), this project, or the
    standard library module. py-spy names files relative to their sys.path entry."""
    match = re.match(r".*? \((.*?)(?::\d+)?\)$", frame.strip())
    path = match.group(1) if match else frame
    top = path.split("/", 1)[0].removesuffix(".py")
    if top in OURS:
        return f"{top} (bizcenter)"
    return top


def _task(frames: list[str]) -> str:
    """The event-loop callback a sample belongs to: the frame that ``Handle._run`` called
    (for an agent, the agent's function), else the thread's outermost frame."""
    for i, frame in enumerate(frames):
        if frame.startswith("Handle._run ") and i + 1 < len(frames):
            task = frames[i + 1].split(" (", 1)[0]
            if task == "Agent._execute_actor" and i + 2 < len(frames):
                task = frames[i + 2].split(" (", 1)[0].replace("register.<locals>.", "agent ")
            return task
    return frames[0].split(" (", 1)[0] if frames else "?"


def summarize(path: Path, rate: int, seconds: float, top: int = 30) -> dict[str, Any]:
    """Rank what the process spent its samples on. ``cores`` = samples / (rate * seconds):
    1.0 is one core busy for the whole recording."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    by_task: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread (") else "?"
        frames = [f for f in parts if f and not f.startswith(("thread (", "process "))]
        total += count
        if not frames or IDLE.search(frames[-1]):
            idle += count
            continue
        seen = set()
        for frame in frames:
            fn = _function(frame)
            if fn not in seen:
                seen.add(fn)
                inclusive[fn] += count
        self_time[_function(frames[-1])] += count
        by_package[_package(frames[-1])] += count
        by_task[f"{thread}: {_task(frames)}"] += count
    busy = total - idle
    full = rate * seconds

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": fn, "samples": n, "shareOfBusy": round(n / busy, 4) if busy else 0,
                 "cores": round(n / full, 3) if full else None}
                for fn, n in counter.most_common(top)]

    return {
        "file": str(path),
        "samples": total,
        "idleSamples": idle,
        "busyCores": round(busy / full, 3) if full else None,
        "byTask": share(by_task),
        "selfByPackage": share(by_package),
        "topSelf": share(self_time),
        "topInclusive": share(inclusive),
    }
