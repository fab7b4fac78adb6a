"""PostgreSQL engines: SQLAlchemy 2 asyncio over asyncpg, one schema per component."""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def make_engine(url: str, schema: str, pool_size: int = 10) -> AsyncEngine:
    """An engine whose connections use ``schema`` (search_path) and nothing else."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs three round trips per checkout (measured: 10-29 % of the
        # worker's throughput, docs/performance.md). A connection that died fails its call
        # once (an INTERNAL reply, or a retried batch in the account center) and SQLAlchemy
        # then invalidates the pool; recycling retires connections before servers or
        # middleboxes drop idle ones.
        pool_pre_ping=False,
        pool_recycle=1800,
        # Errors and SQL logs never show bound values (PIN verifiers, OTP digests, ...).
        hide_parameters=True,
        connect_args={"server_settings": {"search_path": schema, "application_name": "bizcenter"}},
    )


async def ensure_schema(engine: AsyncEngine, schema: str, ddl: str) -> None:
    """Create ``schema`` and run idempotent ``ddl`` (CREATE ... IF NOT EXISTS statements).

    Serialised with an advisory lock so that several processes starting together do not
    race on CREATE TABLE.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": schema})
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        for statement in (s.strip() for s in ddl.split(";")):
            if statement:
                await conn.execute(text(statement))
