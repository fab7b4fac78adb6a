"""Operating the system, for real: ``bizcenter run`` (what ``make run`` runs) in its own
topics and schemas, its output a screenful with the balances and where the logs are, every
child's log line JSON with BIZ_LOG_FORMAT=json; the
worker's ``/healthz`` and ``/readyz`` (503 until the worker is ready, then 200);
``bizcenter reconcile`` exit 0 after the run and 1 after a ledger row is changed behind the
account center's back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from conftest import wait_for
from sqlalchemy import text
from system import ROOT, System

from reference.account_center.ledger import Ledger

#: The line ``bizcenter run`` prints once the demo is over and the processes keep running.
RUNNING = "are running"


class Run:
    """``bizcenter run`` as a child process, its output read line by line."""

    def __init__(self, system: System, cwd: Path) -> None:
        self.system = system
        self.cwd = cwd
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        env = {**self.system.env(), "PYTHONPATH": str(ROOT)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "run", cwd=self.cwd, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        assert self.proc.returncode is not None
        return self.proc.returncode


async def _get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.json(content_type=None)


def _reconcile(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "reconcile", *args],
                          env={**system.env(), "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ran(kafka_bootstrap: str, database_url: str, isolation_id: str,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Any]]:
    """One ``bizcenter run`` to its "running" line, /readyz polled from its start; then
    Ctrl-C. Yields what was seen."""
    tmp = tmp_path_factory.mktemp("run")
    # JSON log lines (BIZ_LOG_FORMAT=json), as a log collector wants them.
    system = System.build(kafka_bootstrap, database_url, isolation_id, tmp, log_format="json")
    port = system.settings.web_port
    run = Run(system, tmp)
    statuses: list[int] = []  # /readyz answers in order (connection refused not counted)
    health: list[tuple[int, Any]] = []

    async def poll_readiness() -> None:
        while True:
            try:
                status, body = await _get(port, "/readyz")
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            if not statuses or statuses[-1] != status:
                statuses.append(status)
                health.append((status, body))
            if status == 200:
                return
            await asyncio.sleep(0.05)

    await run.start()
    poller = asyncio.create_task(poll_readiness())
    try:
        try:
            await wait_for(lambda: any(RUNNING in line for line in run.lines)
                           or (run.proc is not None and run.proc.returncode is not None),
                           timeout=240, interval=0.2, what="bizcenter run's running line")
        except AssertionError:
            raise AssertionError("no running line:\n" + run.output()) from None
        assert any(RUNNING in line for line in run.lines), run.output()
        await asyncio.wait_for(poller, 60)
        healthz = await _get(port, "/healthz")
        ready_after = await _get(port, "/readyz")
        rc = await run.stop()
        yield {"run": run, "system": system, "statuses": statuses, "health": health,
               "healthz": healthz, "ready_after": ready_after, "rc": rc, "cwd": tmp}
    finally:
        poller.cancel()
        await run.stop()
        system.ledger = Ledger.from_settings(system.settings, pool_size=1)
        await system.close()


@pytest.mark.integration
async def test_run_prints_a_screenful_with_the_balances_and_the_logs(ran: dict[str, Any]
                                                                    ) -> None:
    run: Run = ran["run"]
    print(run.output())  # shown by pytest -rP
    before = next(i for i, line in enumerate(run.lines) if RUNNING in line)
    assert before < 60, f"{before} lines before the running line:\n{run.output()}"
    out = run.output()
    assert "balances before" in out and "balances after" in out, out
    assert out.count("outcome: {") == 3, out  # two transfers and a top-up, each final
    after = next(line for line in run.lines if line.startswith("balances after"))
    # alice sent 12.50 + 750.00, bob received them and topped up 40.00
    assert "acc-alice 9,237.50" in after and "acc-bob 10,802.50" in after, out
    logs = Path(ran["cwd"]) / ".local" / "logs"
    for name in ("worker", "account-center", "funding-provider"):
        assert f".local/logs/{name}.log" in out, out
        assert (logs / f"{name}.log").stat().st_size > 0, name
    assert "Worker ready" in (logs / "worker.log").read_text(), "the worker's log is elsewhere"
    assert ran["rc"] == 0, out  # Ctrl-C: a clean stop


@pytest.mark.integration
async def test_every_log_line_of_every_process_is_json(ran: dict[str, Any]) -> None:
    logs = Path(ran["cwd"]) / ".local" / "logs"
    for name in ("worker", "account-center", "funding-provider"):
        lines = (logs / f"{name}.log").read_text().splitlines()
        assert lines, name
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(f"{name}.log:{number} is not JSON: {line[:200]}") from None
            assert {"ts", "level", "logger", "message"} <= set(record), line


@pytest.mark.integration
async def test_readyz_is_503_until_the_worker_is_ready_then_200(ran: dict[str, Any]) -> None:
    statuses, health = ran["statuses"], ran["health"]
    assert statuses[-1] == 200, health
    assert 503 in statuses[:-1], f"never saw the worker not ready: {health}"
    not_ready = next(body for status, body in health if status == 503)
    assert not_ready["ready"] is False and not all(not_ready["checks"].values()), not_ready
    status, body = ran["ready_after"]
    assert status == 200, body
    assert body == {"ready": True, "checks": {"assigned": True, "recovered": True,
                                               "consuming": True, "sagaEngine": True,
                                               "postgres": True}}
    assert ran["healthz"] == (200, {"status": "alive"})


@pytest.mark.integration
async def test_reconcile_is_0_after_the_run_and_1_after_a_drift(ran: dict[str, Any]) -> None:
    system: System = ran["system"]
    balanced = _reconcile(system, "--json")
    assert balanced.returncode == 0, balanced.stdout + balanced.stderr
    report = json.loads(balanced.stdout)
    assert report["balanced"] is True and report["drifts"] == [], report
    usd = report["totals"]["USD"]
    assert usd["seeded"] == 4 * 1_000_000 and usd["funded"] == 4_000, usd
    assert usd["balances"] == usd["seeded"] + usd["funded"] and usd["clearing"] == 0, usd

    # A balance changed behind the account center's back: 1 cent out of thin air.
    ledger = Ledger.from_settings(system.settings, pool_size=1)
    try:
        async with ledger.engine.begin() as conn:
            await conn.execute(text("UPDATE accounts SET balance_minor = balance_minor + 1 "
                                    "WHERE account_id = 'acc-carol'"))
    finally:
        await ledger.close()
    drift = _reconcile(system)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    table = drift.stdout
    assert "DRIFT" in table, table
    rows = [line.split() for line in table.splitlines() if line.endswith("+1")]
    # the drift table: check, subject, expected, actual, difference
    assert ["balances", "=", "journal", "acc-carol", "1000000", "1000001", "+1"] in rows, table
    assert ["money", "conserved", "USD", "4004000", "4004001", "+1"] in rows, table
    as_json = json.loads(_reconcile(system, "--json").stdout)
    assert as_json["balanced"] is False
    assert {(d["check"], d["subject"], d["difference"]) for d in as_json["drifts"]} == {
        ("balances = journal", "acc-carol", 1), ("money conserved", "USD", 1)}
