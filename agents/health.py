"""Operator endpoints of the worker's web server: ``/healthz``, ``/readyz``, ``/metrics``.

    GET /healthz   200 {"status": "alive"} while the process's event loop answers.
    GET /readyz    200 {"ready": true, "checks": {...}} once the worker can do its work,
                   else 503 with the same body naming the checks that fail.

Ready means all of:

``assigned``
    the worker has joined its consumer group and received an assignment, and no rebalance
    is under way (an empty assignment counts: a group with more workers than partitions
    keeps the spare ones idle but ready to take over);
``recovered``
    Faust's end of the latest rebalance has completed and is not running again (its
    recovery step: the stream partitions sought to their committed offsets and resumed).
    The worker keeps no Faust table (every query table is PostgreSQL's), so there is
    nothing to rebuild: this holds moments after ``assigned``;
``consuming``
    the consumer's flow is on and its fetcher runs (records are being fetched);
``sagaEngine``
    the saga engine's loop runs (agents/saga_engine.py: started once the app is up, false
    once it failed);
``postgres``
    PostgreSQL answers ``SELECT 1`` within :data:`app.adapters.db.POSTGRES_TIMEOUT_SECONDS`
    (the result is kept for :data:`app.adapters.db.POSTGRES_CACHE_SECONDS`, so that a probe
    every second costs one query per second at most).

Neither endpoint needs a token and neither says anything about the data: only
``true``/``false`` per check. The checks read Faust's own state
(:func:`readiness_checks`), so a unit test can drive them with a stand-in app.
"""

from __future__ import annotations

from typing import Any

from app import metrics
from app.adapters.db import PostgresProbe, make_engine


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


def register_health_views(app: Any, database_url: str, schema: str,
                          engine: Any = None) -> None:
    """Add ``/healthz`` and ``/readyz`` to the Faust app's web server; with the saga
    engine (agents/saga_engine.py), ``/readyz`` also needs it running (started, not
    failed)."""
    from faust import web

    probe = PostgresProbe(make_engine(database_url, schema, pool_size=1))

    @app.page("/healthz", name="healthz")
    class Healthz(web.View):
        async def get(self, request: web.Request) -> web.Response:
            return self.json({"status": "alive"})

    @app.page("/readyz", name="readyz")
    class Readyz(web.View):
        async def get(self, request: web.Request) -> web.Response:
            checks = readiness_checks(app)
            if engine is not None:
                checks["sagaEngine"] = bool(engine.running)
            checks["postgres"] = await probe.ok()
            ready = all(checks.values())
            return self.json({"ready": ready, "checks": checks},
                             status=200 if ready else 503)

    async def close_probe(sender: Any, **kwargs: Any) -> None:
        await probe.close()

    app.on_before_shutdown.connect(close_probe)


def register_metrics_view(app: Any) -> None:
    """``GET /metrics`` on a Faust app's web server (no token: the metrics hold counts,
    never ids or amounts of a user)."""
    from faust import web

    @app.page("/metrics", name="metrics")
    class Metrics(web.View):
        async def get(self, request: web.Request) -> web.Response:
            body, content_type = metrics.exposition()
            # aiohttp refuses a charset in content_type=: the header is set as is.
            return self.bytes(body, headers={"Content-Type": content_type})
