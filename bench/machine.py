"""What the run ran on, and where the CPU went (Linux ``/proc``)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.config import ROOT

PACKAGES = ("faust-streaming", "aiokafka", "sqlalchemy", "asyncpg", "orjson", "pydantic",
            "rocksdict", "mode-streaming")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    match = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    return round(int(match.group(1)) / 2**20, 1) if match else None


def _processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read(entry / "stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                found.append((int(entry.name), ppid,
                              _read(entry / "cmdline").replace("\0", " ").strip()))
    return found


def kafka_pid() -> int | None:
    """The broker of ``make up`` (its pid file), else any local ``kafka.Kafka`` process."""
    text = _read(ROOT / ".local" / "kafka" / "kafka.pid").strip()
    if text.isdigit() and Path(f"/proc/{text}").exists():
        return int(text)
    brokers = [pid for pid, _, cmd in _processes() if " kafka.Kafka " in f" {cmd} "]
    return brokers[0] if len(brokers) == 1 else None


def kafka_version() -> str:
    """From the running broker's class path (``libs-<version>``), else ``KAFKA_VERSION``."""
    pid = kafka_pid()
    if pid is not None:
        cmdline = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
        match = re.search(r"libs-([0-9][^/\s]*)/", cmdline) or re.search(
            r"kafka_[0-9.]+-([0-9][^/\s]*?)\.jar", cmdline)
        if match:
            return match.group(1)
    return os.environ.get("KAFKA_VERSION", "unknown")


def postmaster_pid() -> int | None:
    """The PostgreSQL of ``make up``, else the one local postmaster (a ``postgres`` process
    whose parent is not one)."""
    first = _read(ROOT / ".local" / "pg" / "data" / "postmaster.pid").split("\n", 1)[0].strip()
    if first.isdigit() and Path(f"/proc/{first}").exists():
        return int(first)
    procs = _processes()
    postgres = {pid for pid, _, cmd in procs if cmd.split(" ", 1)[0].endswith("/postgres")}
    roots = [pid for pid, ppid, _ in procs if pid in postgres and ppid not in postgres]
    return roots[0] if len(roots) == 1 else None


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        # What the benchmark itself writes does not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!bench/results", ":!docs/performance.md"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


#: libpython as a shared library mapped into the process (``--enable-shared``).
_SHARED_LIBPYTHON = re.compile(r"/libpython3[^/\s]*\.so")


def python_build(maps: str | None = None) -> dict[str, str]:
    """The interpreter of the run: every process the benchmark starts runs it (its
    executable), so its build moves every figure, and runs compare only on the same one.
    Its executable (resolved), its full version line (release, build date, compiler) and
    whether libpython is a shared library (``maps``: this process's ``/proc/self/maps``;
    ``unknown`` without it). These name the interpreter; they do not tell how it was
    optimized (``sysconfig`` cannot either: Debian's reports its shared build's
    configuration). On this machine Debian's 3.11.2 (profile-guided and link-time
    optimization, static) cost the worker ~16 % less CPU per transfer than pyenv's 3.11.7
    (neither, shared), docs/performance.md, session 29."""
    if maps is None:
        maps = _read("/proc/self/maps")
    linked = ("unknown" if not maps
              else "shared" if _SHARED_LIBPYTHON.search(maps) else "static")
    return {
        "executable": os.path.realpath(sys.executable),
        "version": " ".join(sys.version.split()),
        "libpython": linked,
    }


def describe(postgres_version: str | None) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpuCount": os.cpu_count(),
        "cpuModel": cpu_model(),
        "memoryGiB": memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pythonBuild": python_build(),
        "kafka": kafka_version(),
        "postgres": postgres_version,
        "packages": versions,
        "gitCommit": git_commit(),
        "loadAverageAtStart": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------- CPU


def process_cpu_seconds(pid: int, *, reaped: bool = False) -> tuple[float, float] | None:
    """(user, system) CPU seconds of one process so far, its threads included; with
    ``reaped``, those of its children that ended and were waited for too (``cutime``,
    ``cstime``): what a process that starts and ends children (PostgreSQL's postmaster,
    a backend per connection) spent in children no longer alive."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    if reaped:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def children_of(ppid: int) -> list[int]:
    return [pid for pid, parent, _ in _processes() if parent == ppid]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores."""
    fields = [int(x) for x in _read("/proc/stat").split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / CLOCK_TICKS, sum(fields) / CLOCK_TICKS


def machine_stolen() -> float:
    """CPU seconds the hypervisor gave to others while this machine's vCPUs wanted them
    (``steal`` of /proc/stat; counted as busy by :func:`machine_cpu`)."""
    fields = _read("/proc/stat").split("\n", 1)[0].split()[1:]
    return int(fields[7]) / CLOCK_TICKS if len(fields) > 7 else 0.0


def process_runqueue_wait(pid: int) -> float | None:
    """Seconds the threads of one process have spent runnable but waiting for a core, so
    far (the second field of each thread's ``/proc/<pid>/task/<tid>/schedstat``, in ns).
    None when the kernel keeps no schedstat or the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    waited = 0
    seen = False
    for tid in tids:
        raw = _read(f"/proc/{pid}/task/{tid}/schedstat").split()
        if len(raw) >= 2:
            waited += int(raw[1])
            seen = True
    return waited / 1e9 if seen else None


@dataclass
class CpuSnapshot:
    at: float
    machine: tuple[float, float]
    processes: dict[str, tuple[float, float]]
    #: Runqueue waits so far, seconds, by process (where the kernel keeps schedstat).
    waits: dict[str, float] = field(default_factory=dict)
    #: The machine's stolen CPU seconds so far (``machine_stolen``).
    stolen: float = 0.0
    #: PostgreSQL's runqueue waits so far by process id (postmaster and live backends):
    #: a backend that ends has no counter left, so waits are compared pid by pid.
    postgres_waits: dict[int, float] = field(default_factory=dict)


class CpuMeter:
    """CPU seconds of the run's processes (and of the machine) between two snapshots.

    Named processes: the worker(s), the account center, the benchmark process itself (the
    load generator), the Kafka broker and PostgreSQL (the postmaster and its backends; the
    broker and the database are shared with whatever else runs on the machine)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.pids["bench (load generator)"] = os.getpid()
        kafka = kafka_pid()
        if kafka is not None:
            self.pids["kafka"] = kafka

    def snapshot(self, at: float) -> CpuSnapshot:
        values: dict[str, tuple[float, float]] = {}
        waits: dict[str, float] = {}
        for name, pid in self.pids.items():
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                values[name] = seconds
            waited = process_runqueue_wait(pid)
            if waited is not None:
                waits[name] = waited
        postmaster = postmaster_pid()
        if postmaster is not None:
            pids = [postmaster, *children_of(postmaster)]
            # The backends that ended since the last snapshot count too (through the
            # postmaster's reaped children): a connection opened and closed between two
            # snapshots, or one alive at the first and gone at the second, was missed or
            # even subtracted before session 23.
            times = [process_cpu_seconds(postmaster, reaped=True) or (0.0, 0.0),
                     *(process_cpu_seconds(pid) or (0.0, 0.0) for pid in pids[1:])]
            values["postgres"] = (sum(t[0] for t in times), sum(t[1] for t in times))
            postgres_waits = {pid: w for pid in pids
                              if (w := process_runqueue_wait(pid)) is not None}
        else:
            postgres_waits = {}
        return CpuSnapshot(at, machine_cpu(), values, waits, machine_stolen(), postgres_waits)

    @staticmethod
    def between(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, Any]:
        wall = b.at - a.at
        if wall <= 0:
            return {}
        busy = b.machine[0] - a.machine[0]
        total = b.machine[1] - a.machine[1]
        common = [name for name in b.processes if name in a.processes]
        user = {n: b.processes[n][0] - a.processes[n][0] for n in common}
        system = {n: b.processes[n][1] - a.processes[n][1] for n in common}
        per_process = {n: round((user[n] + system[n]) / wall, 3) for n in common}
        ours = sum(per_process.values())
        machine_busy = busy / wall
        return {
            "wallSeconds": round(wall, 2),
            "coresBusy": round(machine_busy, 3),
            "coresTotal": round(total / wall, 2),
            #: Cores used per process (1.0 = one core fully busy).
            "coresByProcess": per_process,
            #: Of which in the kernel (system time: sockets, wake-ups).
            "kernelShareByProcess": {
                n: round(system[n] / (user[n] + system[n]), 3) for n in common
                if user[n] + system[n] > 0},
            #: What the machine spent on anything else (other engineers' tests, the OS).
            "coresOther": round(max(0.0, machine_busy - ours), 3),
            #: Of the busy cores, what the hypervisor gave to other machines (steal).
            "coresStolen": round(max(0.0, b.stolen - a.stolen) / wall, 3),
            #: Seconds per second each process was runnable but waited for a core
            #: (summed over its threads: 0.2 = its threads together waited a fifth of the
            #: time). Above ~0.1 for a process that is not at a full core, the machine's
            #: cores, not the process's own design, held it back.
            #: PostgreSQL's: each process alive at the end, since the start or since it
            #: began (a backend that ended during the window is missed: no counter is
            #: left of it, and it must not subtract what it had at the start either).
            "runqueueWaitByProcess": {
                **{n: round((b.waits[n] - a.waits[n]) / wall, 3)
                   for n in b.waits if n in a.waits},
                **({"postgres": round(sum(w - a.postgres_waits.get(pid, 0.0)
                                          for pid, w in b.postgres_waits.items()) / wall, 3)}
                   if b.postgres_waits else {}),
            },
        }
