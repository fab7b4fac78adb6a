"""The system under test, for real: the business worker and the account center as child
processes (exactly the commands an operator runs), against the real broker and database.

Each test module builds one ``System`` with its own topic prefix, Faust app id (consumer
group), account-center group and PostgreSQL schemas.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text

from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_verifier
from app.domain.ports import FundingSource, UserRecord, UserStatus
from app.settings import Settings
from events.topics import ensure_topics
from reference.account_center.ledger import Ledger
from reference.account_center.service import announce_openings
from reference.gateway_client import GatewayClient, TopicTail
from reference.user_center import issue_access_token

ROOT = Path(__file__).resolve().parent.parent
PIN = "97531864"

FINAL = ("ok", "error")


def is_final(reply: dict[str, Any]) -> bool:
    """A reply that ends a request (pending OTP_REQUIRED ends a confirm too)."""
    return reply["status"] in FINAL or reply.get("code") == "OTP_REQUIRED"


@dataclass
class System:
    settings: Settings
    logdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    client: GatewayClient | None = None
    otps: TopicTail | None = None
    transfer_events: TopicTail | None = None
    store: PostgresBusinessStore | None = None
    ledger: Ledger | None = None

    # ---------------------------------------------------------------- set-up

    @classmethod
    def build(cls, kafka: str, database_url: str, isolation_id: str, tmp: Path,
              **overrides: Any) -> System:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": kafka,
            "database_url": database_url,
            "topic_prefix": f"{isolation_id}.",
            "topic_partitions": 3,
            "app_id": f"{isolation_id}-worker",
            "account_center_group": f"{isolation_id}-ac",
            "funding_provider_group": f"{isolation_id}-fp",
            "db_schema": f"{isolation_id}_biz",
            "account_center_db_schema": f"{isolation_id}_ac",
            "table_store": "memory://",
            "data_dir": str(tmp / "worker-data"),
            "tick_interval_seconds": 0.5,
            "account_command_timeout_seconds": 3.0,
            "db_pool_size": 5,
            # The web server is on by default: every system (and start_worker) its own port.
            "web_port": free_port(),
            "account_center_web_port": free_port(),  # its /metrics, /healthz, /readyz
            # The children run the development secrets: a production environment would
            # refuse to start (cli/main.py).
            "environment": "development",
        }
        values.update(overrides)
        return cls(Settings(**values), tmp)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("BIZ_") and k not in ("KAFKA_BOOTSTRAP_SERVERS",
                                                         "DATABASE_URL")}
        s = self.settings
        for name in Settings.model_fields:
            value = getattr(s, name)
            if name == "kafka_bootstrap_servers":
                key = "KAFKA_BOOTSTRAP_SERVERS"
            elif name == "database_url":
                key = "DATABASE_URL"
            else:
                key = f"BIZ_{name.upper()}"
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            if isinstance(value, list):
                value = json.dumps(value)
            env[key] = str(value)
        env["BIZ_ENV_FILE"] = "/nonexistent"
        return env

    async def start(self, *, worker_env: dict[str, str] | None = None) -> None:
        await ensure_topics(self.settings)
        self.store = PostgresBusinessStore.from_settings(self.settings)
        await self.store.migrate()
        self.ledger = Ledger.from_settings(self.settings)
        await self.ledger.migrate()
        self.client = GatewayClient(self.settings)
        await self.client.start()
        self.otps = TopicTail(self.settings, self.settings.topic("notifications.otp"),
                              from_beginning=True)
        await self.otps.start()
        self.transfer_events = TopicTail(
            self.settings, self.settings.topic("business.transfer-events"), from_beginning=True)
        await self.transfer_events.start()
        self.start_process("account-center")
        self.start_process("funding-provider")
        self.start_process("worker", env=worker_env)

    def start_process(self, name: str, *, command: str | None = None,
                      env: dict[str, str] | None = None) -> None:
        """Run ``bizcenter <command or name>`` as the process ``name``, with the settings'
        environment plus ``env``."""
        assert name not in self.processes or self.processes[name].poll() is not None
        log = open(self.logdir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "cli", command or name], env={**self.env(), **(env or {})},
            cwd=self.logdir, stdout=log, stderr=subprocess.STDOUT,
        )

    def start_worker(self, name: str, *, web_port: int) -> None:
        """Another worker process in the same group, with its own web port and data dir."""
        self.start_process(name, command="worker", env={
            "BIZ_WEB_PORT": str(web_port),
            "BIZ_DATA_DIR": str(self.logdir / f"{name}-data"),
        })

    async def group_state(self) -> tuple[str, int]:
        """(state, number of members) of the workers' consumer group, e.g. ("Stable", 2)."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([self.settings.app_id])
            groups = response.to_object()["groups"]
        finally:
            await admin.close()
        if not groups:
            return "Unknown", 0
        return str(groups[0].get("state")), len(groups[0].get("members") or [])

    async def stop_process(self, name: str, *, kill: bool = False, timeout: float = 60) -> None:
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while proc.poll() is None:
            if loop.time() > deadline:
                proc.kill()
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for name in list(self.processes):
            await self.stop_process(name)
        for tail in (self.client, self.otps, self.transfer_events):
            if tail is not None:
                await tail.stop()
        await self.drop_everything()
        if self.store is not None:
            await self.store.close()
        if self.ledger is not None:
            await self.ledger.close()

    async def drop_everything(self) -> None:
        assert self.ledger is not None
        async with self.ledger.engine.begin() as conn:
            for schema in (self.settings.db_schema, self.settings.account_center_db_schema):
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            prefix = self.settings.topic_prefix
            mine = [t for t in await admin.list_topics()
                    if t.startswith(prefix) or t.startswith(self.settings.app_id)]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()

    async def produce(self, topic: str, key: bytes, value: dict[str, Any]) -> None:
        """Publish a record as another component would (e.g. account events)."""
        assert self.client is not None and self.client._producer is not None
        await self.client._producer.send_and_wait(self.settings.topic(topic),
                                                  json.dumps(value).encode(), key=key)

    async def http_get(self, port: int, path: str, token: str | None = None
                       ) -> tuple[int, Any, dict[str, str]]:
        """GET a worker's web server: (status, JSON body, headers)."""
        import aiohttp

        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            text = await response.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return response.status, body, dict(response.headers)

    def log_tail(self, name: str, lines: int = 60) -> str:
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""

    # ---------------------------------------------------------------- data

    async def add_user(self, user_id: str, *, balance: int, threshold: int = 100_000,
                       daily_limit: int = 10_000_000, open_account: bool = True,
                       currency: str = "USD") -> UserRecord:
        assert self.store is not None and self.ledger is not None
        pepper = self.settings.pin_pepper.get_secret_value().encode()
        user = UserRecord(
            user_id=user_id, account_id=f"acc-{user_id}", currency=currency,
            phone=f"+1555{abs(hash(user_id)) % 10**7:07d}",
            pin_verifier=pin_verifier(pepper, user_id, PIN), otp_threshold_minor=threshold,
            daily_limit_minor=daily_limit, status=UserStatus.ACTIVE,
        )
        await self.store.upsert_user(user)
        if open_account:
            await self.ledger.open_account(user.account_id, currency, balance)
            assert self.client is not None
            await announce_openings(self.settings, self.ledger, [user.account_id],
                                    self.client._producer)
        return user

    async def add_funding_source(self, user_id: str, source_id: str, *,
                                 kind: str = "card") -> None:
        assert self.store is not None
        await self.store.upsert_funding_source(FundingSource(
            source_id, user_id, kind, f"{kind} of {user_id}", UserStatus.ACTIVE))

    def token(self, user_id: str, **kwargs: Any) -> str:
        return issue_access_token(self.settings, user_id, **kwargs)

    # ---------------------------------------------------------------- the protocol

    async def final(self, request_id: str, timeout: float = 60.0, *, first: bool = False
                    ) -> dict[str, Any]:
        """The reply that ends ``request_id`` (skipping pending IN_PROGRESS unless
        ``first``: then the first reply, whatever it is)."""
        assert self.client is not None
        client = self.client

        def found(_: Any) -> dict[str, Any] | None:
            return next((r for r in client.replies.get(request_id, [])
                         if first or is_final(r)), None)

        try:
            return await client.wait(found, timeout)  # type: ignore[no-any-return]
        except TimeoutError:
            raise AssertionError(
                f"no final reply to {request_id} in {timeout}s\n--- worker log ---\n"
                f"{self.log_tail('worker')}\n--- account-center log ---\n"
                f"{self.log_tail('account-center')}"
            ) from None

    async def call(self, command_type: str, user_id: str, payload: dict[str, Any], *,
                   idem: str | None = None, token: str | None = None,
                   operator_id: str | None = None, timeout: float = 60.0,
                   first: bool = False) -> dict[str, Any]:
        assert self.client is not None
        env = self.client.envelope(command_type, operator_id or user_id,
                                   token if token is not None else self.token(user_id),
                                   payload, idempotency_key=idem)
        await self.client.send(env)
        return await self.final(env["requestId"], timeout, first=first)

    async def init(self, user_id: str, to_account: str, amount: int, **kw: Any
                   ) -> dict[str, Any]:
        return await self.call("transferInit", user_id, {
            "toAccountId": to_account, "amountMinor": amount, "currency": "USD"}, **kw)

    async def confirm(self, user_id: str, transfer_token: str, *, idem: str | None = None,
                      pin: str = PIN, **kw: Any) -> dict[str, Any]:
        return await self.call("transferConfirm", user_id,
                               {"transferToken": transfer_token, "pin": pin},
                               idem=idem or str(uuid.uuid4()), **kw)

    async def otp_for(self, transfer_id: str, timeout: float = 30.0) -> str:
        assert self.otps is not None
        found = await self.otps.wait(lambda msgs: next(
            (v for _k, v in msgs if v.get("transferId") == transfer_id), None), timeout)
        return str(found["otp"])

    async def transfer(self, user_id: str, to_account: str, amount: int, *,
                       idem: str | None = None) -> dict[str, Any]:
        """A whole transfer; reads the OTP from notifications.otp when one is needed."""
        init = await self.init(user_id, to_account, amount)
        if init["status"] != "ok":
            return init
        idem = idem or str(uuid.uuid4())
        reply = await self.confirm(user_id, init["data"]["transferToken"], idem=idem)
        if reply.get("code") == "OTP_REQUIRED":
            otp = await self.otp_for(reply["data"]["transferId"])
            reply = await self.call("verifyOtp", user_id, {"otp": otp}, idem=idem)
        return reply

    async def balances(self, *account_ids: str) -> dict[str, int | None]:
        assert self.ledger is not None
        return {a: await self.ledger.balance(a) for a in account_ids}

    async def group_lag(self, group: str, topics: list[str]) -> int:
        """Messages of ``topics`` not yet committed by consumer group ``group``."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await admin.start()
        await consumer.start()
        try:
            committed = await admin.list_consumer_group_offsets(group)
            tps = [TopicPartition(t, p) for t in topics
                   for p in range(self.settings.topic_partitions)]
            ends = await consumer.end_offsets(tps)
            lag = 0
            for tp in tps:
                meta = committed.get(tp)
                lag += ends[tp] - (meta.offset if meta is not None and meta.offset >= 0 else 0)
            return lag
        finally:
            await consumer.stop()
            await admin.close()

    def worker_input_topics(self) -> list[str]:
        """Every topic the workers' consumer group reads (tables' changelogs aside)."""
        t = self.settings.topic
        return [t("business.commands"), t("business.saga-inputs"), t("account.events"),
                t("funding.events"), t("business.transfer-events"), t("business.queries")]

    async def money_moved_more_than_once(self) -> list[tuple[str, str, int]]:
        """(transferId, command type, times) of every transfer whose debit, credit or refund
        the ledger applied more than once (under different command ids: e.g. two sagas)."""
        assert self.ledger is not None
        async with self.ledger.engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT transfer_id, type, count(*) FROM processed_commands "
                "WHERE result->>'type' <> 'rejected' "
                "GROUP BY transfer_id, type HAVING count(*) > 1"))).all()
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def balances_off_from(self, opening: dict[str, int],
                                completed: list[tuple[str, str, int]]) -> dict[str, Any]:
        """Accounts whose balance is not their opening balance minus what they sent plus
        what they received over the ``completed`` (payer, payee, amount) transfers:
        {account: (expected, actual)}; empty when every account moved exactly once."""
        expected = dict(opening)
        for payer, payee, amount in completed:
            expected[payer] -= amount
            expected[payee] += amount
        actual = await self.balances(*expected)
        return {a: (expected[a], actual[a]) for a in expected if actual[a] != expected[a]}


def free_port() -> int:
    """A TCP port nobody listens on right now (for a worker's web server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kafka_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Kafka's own command-line tools, as an operator runs them (infra/kafka.sh)."""
    return subprocess.run([str(ROOT / "infra" / "kafka.sh"), *args], capture_output=True,
                          text=True, timeout=180, check=False)
