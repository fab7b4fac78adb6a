"""The system under test, for real: the business worker and the account center as child
processes (exactly the commands an operator runs), against the real broker and database.

Each test module builds one ``System`` with its own topic prefix, Faust app id (consumer
group), account-center group and PostgreSQL schemas.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from agents.saga_engine import saga_group
from app.adapters.postgres_store import PostgresBusinessStore
from app.child_env import child_env
from app.domain.ports import FundingSource, UserRecord, UserStatus
from app.settings import Settings
from events.consumer_groups import group_lag, group_state
from events.topics import ensure_topics
from reference.account_center.ledger import Ledger
from reference.account_center.service import announce_openings
from reference.gateway_client import GatewayClient, TopicTail
from reference.system_harness import (
    balances_off,
    drop_run,
    free_port,
    log_tail,
    seed_user,
    start_child,
    stop_children,
)
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
        """The children's environment: every setting explicit, no env file."""
        return child_env(self.settings)

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
        self.processes[name] = start_child(
            [sys.executable, "-m", "cli", command or name], env={**self.env(), **(env or {})},
            log=self.logdir / f"{name}.log", cwd=self.logdir)

    def start_worker(self, name: str, *, web_port: int) -> None:
        """Another worker process in the same group, with its own web port and data dir."""
        self.start_process(name, command="worker", env={
            "BIZ_WEB_PORT": str(web_port),
            "BIZ_DATA_DIR": str(self.logdir / f"{name}-data"),
        })

    async def group_state(self) -> tuple[str, int]:
        """(state, number of members) of the workers' consumer group, e.g. ("Stable", 2)."""
        return await group_state(self.settings.kafka_bootstrap_servers, self.settings.app_id)

    async def stop_process(self, name: str, *, kill: bool = False, timeout: float = 60) -> None:
        proc = self.processes.get(name)
        if proc is not None:
            await stop_children({name: proc}, timeout=timeout, kill=kill)

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
        await drop_run(self.settings, self.ledger)

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
        return log_tail(self.logdir / f"{name}.log", lines)

    # ---------------------------------------------------------------- data

    async def add_user(self, user_id: str, *, balance: int, threshold: int = 100_000,
                       daily_limit: int = 10_000_000, open_account: bool = True,
                       currency: str = "USD") -> UserRecord:
        assert self.store is not None and self.ledger is not None
        user = await seed_user(
            self.store, self.ledger, self.settings.pin_pepper.get_secret_value().encode(),
            user_id=user_id, pin=PIN, phone=f"+1555{abs(hash(user_id)) % 10**7:07d}",
            currency=currency, balance_minor=balance, otp_threshold_minor=threshold,
            daily_limit_minor=daily_limit, open_account=open_account)
        if open_account:
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
        return await group_lag(self.settings.kafka_bootstrap_servers, group, topics,
                               self.settings.topic_partitions)

    def worker_groups(self) -> dict[str, list[str]]:
        """The workers' two consumer groups and the topics each reads: the saga engine's
        and the Faust app's (only the queries: it has no table left)."""
        t = self.settings.topic
        return {
            saga_group(self.settings): [t("business.commands"), t("business.saga-inputs"),
                                        t("account.events"), t("funding.events")],
            self.settings.app_id: [t("business.queries")],
        }

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
        assert self.ledger is not None
        return await balances_off(self.ledger, opening, completed)


def kafka_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Kafka's own command-line tools, as an operator runs them (infra/kafka.sh)."""
    return subprocess.run([str(ROOT / "infra" / "kafka.sh"), *args], capture_output=True,
                          text=True, timeout=180, check=False)
