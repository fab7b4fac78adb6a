"""An outage of the broker is waited out, never answered nor skipped (issue 9): the broker
stops answering for 20 s under load, then goes on; every request gets its real answer,
money moves once and is conserved.

Isolated from the shared broker: this module starts a Kafka broker of its own (the same
jars as ``infra/kafka.sh``, its own ports and data directory) and the worker, the account
center and the funding provider use it. The outage is played twice: the broker **frozen**
(SIGSTOP, then SIGCONT: connections stay open and nothing answers, as when a broker hangs
or its network goes away), then **stopped** (SIGTERM, then started again on its data:
connections refused, then a broker that lost every session).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient
from conftest import _missing, wait_for
from sqlalchemy import text
from system import ROOT, System, free_port

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 20.0
KAFKA = ROOT / ".local" / "kafka"


def _libs() -> Path:
    """The jars ``make up`` fetched. Without them (services from elsewhere, e.g. docker
    compose) the test is reported as conftest reports a missing service: skipped, or
    failed in CI."""
    found = sorted(KAFKA.glob("libs-*"))
    if not found or shutil.which("java") is None:
        _missing(f"a private Kafka broker (java and the jars under {KAFKA}, `make jars`)")
    return found[-1]


class PrivateBroker:
    """A single-node KRaft broker of this module only."""

    def __init__(self, home: Path) -> None:
        self.home = home
        port, controller = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{port}"
        self.props = home / "server.properties"
        self.props.write_text("\n".join([
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={home / 'data'}", "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0", "num.network.threads=2",
            "num.io.threads=2", "background.threads=2",
            "log.cleaner.dedupe.buffer.size=8388608", "",
        ]))
        self.jvm = ["java", "-Xms128m", "-Xmx384m", "-XX:+UseSerialGC",
                    "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                    f"-Dkafka.logs.dir={home / 'logs'}",
                    f"-Dlog4j.configuration=file:{KAFKA / 'log4j.properties'}",
                    "-cp", f"{_libs()}/*"]
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        subprocess.run([*self.jvm, "kafka.tools.StorageTool", "format", "-t", cluster, "-c",
                        str(self.props), "--ignore-formatted"], check=True,
                       capture_output=True, timeout=180)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.home / "server.log", "ab") as log:
            self.proc = subprocess.Popen([*self.jvm, "kafka.Kafka", str(self.props)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def private_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path_factory.mktemp("broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def _answers(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(private_broker: PrivateBroker, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    bootstrap = private_broker.bootstrap
    await wait_for(lambda: _answers(bootstrap), timeout=180, interval=1.0,
                   what="the private broker to answer")
    sys_ = System.build(bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("broker-outage"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def _debits(system: System, transfer_id: str) -> int:
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT count(*) FROM processed_commands WHERE transfer_id = :t AND type = 'debit'"
        ), {"t": transfer_id})
        return int(rows.scalar_one())


@pytest.mark.parametrize("how", ["frozen", "stopped"])
async def test_the_broker_away_for_20s_under_load(system: System,
                                                  private_broker: PrivateBroker,
                                                  how: str) -> None:
    payers = [f"b{uuid.uuid4().hex[:7]}" for _ in range(4)]
    payee = f"b{uuid.uuid4().hex[:7]}"
    for payer in payers:
        await system.add_user(payer, balance=100_000)
    await system.add_user(payee, balance=0)
    accounts = [f"acc-{p}" for p in (*payers, payee)]
    before = await system.balances(*accounts)
    done: list[dict[str, Any]] = []

    async def transfers_of(payer: str) -> None:
        for i in range(6):
            done.append(await system.transfer(payer, f"acc-{payee}", 100 + i))

    load = [asyncio.create_task(transfers_of(p)) for p in payers]
    try:
        while len(done) < 4:  # under load: some done, the rest in flight
            await asyncio.wait(load, timeout=0.05)
            assert not any(t.done() and t.exception() for t in load)
        at_outage = len(done)
        if how == "frozen":
            private_broker.signal(signal.SIGSTOP)
        else:
            await asyncio.to_thread(private_broker.stop)
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself, not a synchronisation
        during = len(done)
        if how == "frozen":
            private_broker.signal(signal.SIGCONT)
        else:
            private_broker.start()
        await asyncio.wait_for(asyncio.gather(*load), timeout=240)
    finally:
        if private_broker.proc is None or private_broker.proc.poll() is not None:
            private_broker.start()
        else:
            private_broker.signal(signal.SIGCONT)
        for task in load:
            task.cancel()

    assert at_outage < 24 and during - at_outage <= len(payers), (at_outage, during)
    assert len(done) == 24
    assert all(r["status"] == "ok" and r["data"]["state"] == "COMPLETED" for r in done), [
        r for r in done if r["status"] != "ok"]
    assert {name: p.poll() for name, p in system.processes.items()} == {
        name: None for name in system.processes}
    after = await system.balances(*accounts)
    moved = sum(100 + i for i in range(6))
    assert after == {**{f"acc-{p}": before[f"acc-{p}"] - moved for p in payers},
                     f"acc-{payee}": before[f"acc-{payee}"] + moved * len(payers)}
    for reply in done:
        assert await _debits(system, reply["data"]["transferId"]) == 1
