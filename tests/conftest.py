"""Session fixtures: the real Kafka broker and PostgreSQL.

Where they come from, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` in the environment;
2. the env file that ``make up`` writes (``.local/env``);
3. testcontainers, when a Docker engine answers.
With ``CI=true`` a missing broker or database fails the run; elsewhere the tests that need
them are skipped with the reason. Each test module gets its own topic prefix, Faust app id
(consumer group) and database schemas, so modules can run in any order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from reference.system_harness import env_file_values, local_env_file

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The tests run on the development secrets: every Settings built in this process, and
# every child process whose environment derives from this one or from such settings, is a
# development one (a production environment refuses them, cli/main.py). The tests of the
# production refusal build their children's environment from scratch.
os.environ["BIZ_ENVIRONMENT"] = "development"


def _env_file() -> dict[str, str]:
    return env_file_values(local_env_file(ROOT))


def _tcp_open(hostport: str) -> bool:
    host, _, port = hostport.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _missing(what: str) -> None:
    message = (
        f"{what} is not reachable: run `make up` (or `make test`, which does it), or set "
        f"the environment variable."
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    value = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or _env_file().get("KAFKA_BOOTSTRAP_SERVERS")
    if value and _tcp_open(value):
        yield value
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]

        with KafkaContainer("apache/kafka:3.9.2").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    _missing(f"Kafka ({value or 'no KAFKA_BOOTSTRAP_SERVERS'})")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    value = os.environ.get("DATABASE_URL") or _env_file().get("DATABASE_URL")
    if value:
        yield value
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:15", driver="asyncpg") as pg:
            yield pg.get_connection_url()
        return
    _missing("PostgreSQL (no DATABASE_URL)")


@pytest.fixture(scope="module")
def isolation_id() -> str:
    """Unique per test module: topic prefix, app id and schema names derive from it."""
    return "t" + uuid.uuid4().hex[:10]


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (sync or async) until it returns a truthy value or time runs out.

    The synchronisation primitive of the integration tests: a condition with a deadline,
    never a bare sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
async def pg_admin(database_url: str) -> AsyncIterator[object]:
    """An engine on the test database (public schema) used to drop test schemas at the end."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url, pool_size=2, hide_parameters=True)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # pragma: no cover - reported, not hidden
        await engine.dispose()
        _missing(f"PostgreSQL at {database_url} ({exc})")
    yield engine
    await engine.dispose()
