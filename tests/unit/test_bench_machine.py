"""The benchmark's CPU meter (bench/machine.py): rates from two snapshots, runqueue waits
and stolen time included."""

from __future__ import annotations

import os
import threading
import time

from bench import machine
from bench.machine import CpuMeter, CpuSnapshot


def test_between_gives_rates_per_second_of_wall_time() -> None:
    a = CpuSnapshot(10.0, (100.0, 400.0), {"worker-0": (5.0, 1.0), "kafka": (2.0, 2.0)},
                    {"worker-0": 1.0, "kafka": 0.5}, stolen=3.0)
    b = CpuSnapshot(12.0, (103.0, 404.0), {"worker-0": (6.0, 1.2), "kafka": (2.4, 2.2)},
                    {"worker-0": 1.3, "kafka": 1.1}, stolen=3.4)
    got = CpuMeter.between(a, b)
    assert got["wallSeconds"] == 2.0
    assert got["coresBusy"] == 1.5 and got["coresTotal"] == 2.0
    assert got["coresByProcess"] == {"worker-0": 0.6, "kafka": 0.3}
    assert got["coresOther"] == 0.6
    assert got["coresStolen"] == 0.2
    assert got["runqueueWaitByProcess"] == {"worker-0": 0.15, "kafka": 0.3}


def test_a_process_seen_in_one_snapshot_only_has_no_wait_rate() -> None:
    a = CpuSnapshot(0.0, (0.0, 0.0), {}, {})
    b = CpuSnapshot(1.0, (1.0, 2.0), {"bench": (0.5, 0.0)}, {"bench": 0.2})
    assert CpuMeter.between(a, b)["runqueueWaitByProcess"] == {}


def test_runqueue_waits_of_a_live_process_never_decrease() -> None:
    pid = os.getpid()
    first = machine.process_runqueue_wait(pid)
    assert first is not None and first >= 0.0
    stop = time.monotonic() + 0.2

    def spin() -> None:  # runnable threads, more than the cores now and then
        while time.monotonic() < stop:
            pass

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    later = machine.process_runqueue_wait(pid)
    assert later is not None and later >= first


def test_a_gone_process_has_no_runqueue_wait() -> None:
    gone = 2**22 + 12345  # above the kernel's largest pid (pid_max is at most 2**22)
    assert machine.process_runqueue_wait(gone) is None


def test_stolen_time_is_part_of_the_busy_time() -> None:
    busy, _total = machine.machine_cpu()
    assert 0.0 <= machine.machine_stolen() <= busy


def test_a_reaped_child_s_cpu_counts_for_its_parent() -> None:
    """PostgreSQL's backends end and are waited for by the postmaster: their CPU must not
    vanish from the meter (``reaped``: the parent's cutime and cstime)."""
    import subprocess
    import sys

    me = os.getpid()
    before = machine.process_cpu_seconds(me, reaped=True)
    alone_before = machine.process_cpu_seconds(me)
    subprocess.run([sys.executable, "-c",
                    "import time\nend = time.process_time() + 0.3\n"
                    "while time.process_time() < end: pass"], check=True)
    after = machine.process_cpu_seconds(me, reaped=True)
    alone_after = machine.process_cpu_seconds(me)
    assert before is not None and after is not None
    assert alone_before is not None and alone_after is not None
    child = sum(after) - sum(before) - (sum(alone_after) - sum(alone_before))
    assert child >= 0.25  # the child's 0.3 s of CPU, at the clock's resolution


def test_postgres_waits_are_compared_backend_by_backend() -> None:
    """A backend that ended during the window subtracts nothing; one that began in it
    counts from zero; one alive throughout counts its difference."""
    a = CpuSnapshot(0.0, (0.0, 0.0), {}, {}, postgres_waits={1: 1.0, 2: 5.0, 3: 0.5})
    b = CpuSnapshot(2.0, (1.0, 4.0), {}, {}, postgres_waits={1: 1.4, 3: 0.9, 4: 0.2})
    assert CpuMeter.between(a, b)["runqueueWaitByProcess"] == {"postgres": 0.5}


SHARED_MAPS = (
    "7f3c1a000000-7f3c1a1b8000 r--p 00000000 08:01 1234 "
    "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0\n"
    "7f3c1a400000-7f3c1a422000 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
STATIC_MAPS = (
    "55d0c0000000-55d0c0070000 r--p 00000000 08:01 7 /usr/bin/python3.11\n"
    "7f3c1a400000-7f3c1a422000 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    # an extension module in a python3.11 directory is not libpython
    "7f3c1b000000-7f3c1b010000 r--p 00000000 08:01 5 /venv/lib/python3.11/site-packages/"
    "_cffi_backend.cpython-311-x86_64-linux-gnu.so\n")


def test_the_interpreter_s_build_is_recorded() -> None:
    """Every process of a run runs the benchmark's own interpreter: its build moves every
    figure, so the result names it (docs/performance.md, session 29)."""
    import sys

    shared = machine.python_build(SHARED_MAPS)
    static = machine.python_build(STATIC_MAPS)
    assert shared["libpython"] == "shared" and static["libpython"] == "static"
    assert shared["executable"] == os.path.realpath(sys.executable)
    assert shared["version"].startswith(".".join(map(str, sys.version_info[:3])))
    assert "\n" not in shared["version"]
    assert machine.python_build("")["libpython"] == "unknown"  # no /proc: no claim
    here = machine.python_build()  # this process's own maps
    assert machine.describe(None)["pythonBuild"] == here


def test_the_summary_names_the_interpreter() -> None:
    from bench.report import _interpreter_line

    build = {"version": "3.11.2 (main, Apr 28 2025) [GCC 12.2.0]",
             "executable": "/usr/bin/python3.11", "libpython": "static"}
    assert _interpreter_line({"pythonBuild": build}) == [
        "  python 3.11.2 (main, Apr 28 2025) [GCC 12.2.0], /usr/bin/python3.11, "
        "libpython static"]
    assert _interpreter_line({}) == []  # a result written before the field existed
