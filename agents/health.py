"""Health endpoints of the worker's web server: ``/healthz`` and ``/readyz``.

    GET /healthz   200 {"status": "alive"} while the process's event loop answers.
    GET /readyz    200 {"ready": true, "checks": {...}} once the worker can do its work,
                   else 503 with the same body naming the checks that fail.

Ready means all of:

``assigned``
    the worker has joined its consumer group and received an assignment, and no rebalance
    is under way (an empty assignment counts: a group with more workers than partitions
    keeps the spare ones idle but ready to take over);
``recovered``
    the tables of the assigned partitions are rebuilt from their changelogs (Faust's
    recovery has completed and is not running again);
``consuming``
    the consumer's flow is on and its fetcher runs (records are being fetched);
``postgres``
    PostgreSQL answers ``SELECT 1`` within :data:`POSTGRES_TIMEOUT_SECONDS` (the result is
    kept for :data:`POSTGRES_CACHE_SECONDS`, so that a probe every second costs one query
    per second at most).

Neither endpoint needs a token and neither says anything about the data: only
``true``/``false`` per check. The checks read Faust's own state
(:func:`readiness_checks`), so a unit test can drive them with a stand-in app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

POSTGRES_TIMEOUT_SECONDS = 2.0
POSTGRES_CACHE_SECONDS = 1.0


def readiness_checks(app: Any) -> dict[str, bool]:
    """The Faust-side checks of ``/readyz`` from the app's own state (no I/O)."""
    recovery = getattr(getattr(app, "tables", None), "recovery", None)
    completed = getattr(recovery, "completed", None)
    fetcher = getattr(app, "_fetcher", None)
    crashed = bool(getattr(app, "crashed", False)) or bool(getattr(app, "should_stop", False))
    assigned = (not crashed and getattr(app, "rebalancing_count", 0) > 0
                and not getattr(app, "rebalancing", True))
    recovered = (completed is not None and completed.is_set()
                 and not getattr(app, "in_recovery", True))
    flow = getattr(app, "flow_control", None)
    consuming = (not crashed and flow is not None and flow.is_active()
                 and fetcher is not None and bool(getattr(fetcher, "started", False))
                 and not bool(getattr(fetcher, "should_stop", True)))
    return {"assigned": bool(assigned), "recovered": bool(recovered),
            "consuming": bool(consuming)}


class PostgresProbe:
    """``SELECT 1`` with a deadline, cached for a second; its own one-connection engine."""

    def __init__(self, engine: AsyncEngine, *, clock: Any = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._last: tuple[float, bool] | None = None
        self._lock = asyncio.Lock()

    async def ok(self) -> bool:
        async with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last[0] < POSTGRES_CACHE_SECONDS:
                return self._last[1]
            try:
                await asyncio.wait_for(self._select_one(), POSTGRES_TIMEOUT_SECONDS)
                result = True
            except Exception as exc:  # any failure is "not ready", said in one line
                log.warning("readiness: PostgreSQL does not answer: %s", type(exc).__name__)
                result = False
            self._last = (self._clock(), result)
            return result

    async def _select_one(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self._engine.dispose()


def register_health_views(app: Any, database_url: str, schema: str) -> None:
    """Add ``/healthz`` and ``/readyz`` to the Faust app's web server."""
    from faust import web

    from app.adapters.db import make_engine

    probe = PostgresProbe(make_engine(database_url, schema, pool_size=1))

    @app.page("/healthz", name="healthz")
    class Healthz(web.View):
        async def get(self, request: web.Request) -> web.Response:
            return self.json({"status": "alive"})

    @app.page("/readyz", name="readyz")
    class Readyz(web.View):
        async def get(self, request: web.Request) -> web.Response:
            checks = readiness_checks(app)
            checks["postgres"] = await probe.ok()
            ready = all(checks.values())
            return self.json({"ready": ready, "checks": checks},
                             status=200 if ready else 503)

    async def close_probe(sender: Any, **kwargs: Any) -> None:
        await probe.close()

    app.on_before_shutdown.connect(close_probe)
