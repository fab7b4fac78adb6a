"""An isolated copy of the system for one run: its own topic prefix, Faust app id, consumer
groups, PostgreSQL schemas and worker data directory, so that a run never meets another
run's (or a test's) data. The worker(s) and the account center are child processes started
exactly as an operator starts them (``python -m cli worker``), configured only through
the environment.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.adapters.postgres_store import PostgresBusinessStore
from app.child_env import child_env
from app.settings import Settings
from bench.config import (
    CURRENCY,
    DAILY_LIMIT_MINOR,
    INITIAL_BALANCE_MINOR,
    OTP_THRESHOLD_MINOR,
    PIN,
    ROOT,
    BenchConfig,
)
from events.consumer_groups import group_state
from events.topics import ensure_topics
from reference.account_center.ledger import Ledger
from reference.system_harness import (
    drop_run,
    free_port,
    local_env_file,
    log_tail,
    seed_user,
    start_child,
    stop_children,
)

log = logging.getLogger("bench")

#: Concurrent seeding transactions.
SEED_CONCURRENCY = 8


def base_settings() -> Settings:
    """Kafka and PostgreSQL as ``make up`` wrote them (``.local/env``), or the environment."""
    return Settings(_env_file=local_env_file(ROOT))


def run_settings(base: Settings, run_id: str, cfg: BenchConfig, data_dir: Path) -> Settings:
    values = base.model_dump()
    values.update(
        topic_prefix=f"{run_id}.",
        topic_partitions=cfg.partitions,
        app_id=f"{run_id}-worker",
        account_center_group=f"{run_id}-ac",
        funding_provider_group=f"{run_id}-fp",
        db_schema=f"{run_id}_biz",
        account_center_db_schema=f"{run_id}_ac",
        table_store=cfg.table_store,
        event_loop=cfg.event_loop,
        data_dir=str(data_dir),
        log_level=cfg.log_level,
        environment="development",  # seeded with the development secrets and a known PIN
        # 32 virtual users send step-ups at machine speed: the per-user OTP sends budget
        # (5 per 15 min, issue 11) would refuse nearly all of them with RATE_LIMITED.
        otp_max_sends=1_000_000_000,
    )
    return Settings(**values)


@dataclass(frozen=True, slots=True)
class SeededUser:
    user_id: str
    account_id: str
    token: str


@dataclass
class IsolatedSystem:
    settings: Settings
    cfg: BenchConfig
    run_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    store: PostgresBusinessStore | None = None
    ledger: Ledger | None = None

    @property
    def logdir(self) -> Path:
        return self.run_dir / "logs"

    # ---------------------------------------------------------------- set-up

    async def prepare(self) -> None:
        """Topics and tables of this run (the processes would create them too)."""
        await ensure_topics(self.settings)
        self.store = PostgresBusinessStore.from_settings(self.settings)
        await self.store.migrate()
        self.ledger = Ledger.from_settings(self.settings)
        await self.ledger.migrate()

    async def create_topics(self, *names: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [NewTopic(n, self.cfg.partitions, self.settings.topic_replication_factor)
                       for n in names if n not in existing]
            if missing:
                try:
                    await admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while loop.time() < deadline:  # until every partition has a leader
                described = await admin.describe_topics(list(names))
                if all(t.get("partitions") and all(p.get("leader", -1) >= 0
                                                   for p in t["partitions"])
                       for t in described):
                    break
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    async def seed(self, tokens: dict[str, str]) -> list[SeededUser]:
        """``cfg.accounts`` users with funded accounts, as the user center and the account
        center's operators would create them."""
        assert self.store is not None and self.ledger is not None
        store, ledger = self.store, self.ledger
        pepper = self.settings.pin_pepper.get_secret_value().encode()
        gate = asyncio.Semaphore(SEED_CONCURRENCY)
        users = [f"u{i:06d}" for i in range(self.cfg.accounts)]

        async def one(i: int, user_id: str) -> SeededUser:
            async with gate:
                record = await seed_user(
                    store, ledger, pepper, user_id=user_id, pin=PIN, phone=f"+1555{i:07d}",
                    currency=CURRENCY, balance_minor=INITIAL_BALANCE_MINOR,
                    otp_threshold_minor=OTP_THRESHOLD_MINOR,
                    daily_limit_minor=DAILY_LIMIT_MINOR)
            return SeededUser(user_id, record.account_id, tokens[user_id])

        return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(users))))

    def start_process(self, name: str, command: str | list[str], *,
                      extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``python -m cli <command>`` (or the given argv), logging to
        ``logs/<name>.log``."""
        env = {**child_env(self.settings, pythonpath=ROOT), **(extra_env or {})}
        argv = [sys.executable, "-m", "cli", command] if isinstance(command, str) \
            else command
        proc = start_child(argv, env=env, log=self.logdir / f"{name}.log", cwd=ROOT,
                           new_session=True)
        self.processes[name] = proc
        return proc

    def start_all(self) -> None:
        self.start_process("account-center", "account-center")
        for i in range(self.cfg.workers):
            # One data directory per worker process: RocksDB locks its files.
            # Its own web port too: the web server is on by default (/readyz, queries).
            env = {"BIZ_DATA_DIR": str(Path(self.settings.data_dir) / f"w{i}"),
                   "BIZ_WEB_PORT": str(free_port())}
            command: str | list[str] = "worker"
            if self.cfg.trace or self.cfg.experiments:
                env["BENCH_TRACE_FILE"] = str(self.trace_file(f"worker-{i}"))
                env["BENCH_EXPERIMENTS"] = ",".join(self.cfg.experiments)
                command = [sys.executable, "-m", "bench.traced_worker", "worker"]
            self.start_process(f"worker-{i}", command, extra_env=env)

    def trace_file(self, name: str) -> Path:
        (self.run_dir / "trace").mkdir(parents=True, exist_ok=True)
        return self.run_dir / "trace" / f"{name}.json"

    def worker_pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.processes.items() if n.startswith("worker")}

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.processes.items()}

    def dead(self) -> list[str]:
        return [n for n, p in self.processes.items() if p.poll() is not None]

    async def group_state(self, group: str) -> tuple[str, int]:
        """(state, number of members) of a consumer group, e.g. ("Stable", 2)."""
        return await group_state(self.settings.kafka_bootstrap_servers, group)

    # ---------------------------------------------------------------- tear-down

    async def stop_all(self, timeout: float = 45.0) -> None:
        for name in await stop_children(self.processes, timeout=timeout):
            log.warning("%s did not stop in %.0fs: killed", name, timeout)

    async def close(self, *, drop: bool) -> None:
        if drop and self.ledger is not None:
            await self.drop_everything()
        for resource in (self.store, self.ledger):
            if resource is not None:
                await resource.close()
        shutil.rmtree(self.settings.data_dir, ignore_errors=True)

    async def drop_everything(self) -> None:
        assert self.ledger is not None
        await drop_run(self.settings, self.ledger)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return log_tail(self.logdir / f"{name}.log", lines)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "topicPrefix": s.topic_prefix, "appId": s.app_id,
            "accountCenterGroup": s.account_center_group, "dbSchema": s.db_schema,
            "accountCenterDbSchema": s.account_center_db_schema, "tableStore": s.table_store,
            "eventLoop": s.event_loop,
            "partitions": s.topic_partitions, "workers": self.cfg.workers,
        }
