"""``python -m bench.traced_worker worker``: the business worker with wall-clock timers
around the service layer, for ``python -m bench --trace``.

A sampling profiler (py-spy) sees CPU, but the worker handles one record at a time and
spends most of each record *waiting* (PostgreSQL, the producer); an asyncio wait shows up
as the event loop's ``select()``, not as the coroutine that waits. These timers measure
the wall time of each call instead, from outside: the methods of ``TransferService``,
``PostgresBusinessStore``, the token checks, the table wrappers and the sends are wrapped
before the worker starts (nothing in ``app/`` changes). Every SQL statement and every
connection checkout of the business store's engine is counted as well.

``BENCH_EXPERIMENTS`` (comma separated, ``--experiment`` of the benchmark) applies
measurement-only variants of the worker, to price a proposed change before anyone makes
it; see ``EXPERIMENTS``. They are not product changes and some are unsafe on purpose.

The cumulative figures are written every ``DUMP_INTERVAL`` seconds to the JSON file named
by ``BENCH_TRACE_FILE``; the benchmark subtracts the file read at the start of its measured
window from the one read at its end.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

DUMP_INTERVAL = 0.5

#: Reentrant: the collector's callback (``_gc_timers``) records from inside whatever code
#: allocated, which may be ``_record`` or ``snapshot`` holding it (a plain lock deadlocked
#: the worker).
_lock = threading.RLock()
#: name → [calls, total seconds, max seconds]
_timers: dict[str, list[float]] = {}
_counters: dict[str, int] = {}
#: The message being handled by the saga agent (its type), for attributing SQL statements.
_current = ["-"]


def _record(name: str, seconds: float) -> None:
    with _lock:
        entry = _timers.get(name)
        if entry is None:
            _timers[name] = [1, seconds, seconds]
        else:
            entry[0] += 1
            entry[1] += seconds
            if seconds > entry[2]:
                entry[2] = seconds


def _count(name: str, n: int = 1) -> None:
    with _lock:
        _counters[name] = _counters.get(name, 0) + n


def _timed(name: str, fn: Callable[..., Any], label: Callable[..., str] | None = None
           ) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            full = f"{name}:{label(*args, **kwargs)}" if label else name
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                _record(full, time.perf_counter() - start)
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        full = f"{name}:{label(*args, **kwargs)}" if label else name
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(full, time.perf_counter() - start)
    return wrapper


def _wrap_all(cls: type, prefix: str, names: list[str]) -> None:
    """Time the methods of ``cls`` that exist among ``names`` (the code moves on)."""
    for attr in names:
        if hasattr(cls, attr):
            setattr(cls, attr, _timed(f"{prefix}.{attr}", getattr(cls, attr)))


def install() -> None:
    import agents.faust_app as faust_app
    from agents.saga_engine import SagaEngine
    from app.adapters import saga_state
    from app.adapters.postgres_store import PostgresBusinessStore
    from app.tokens import AccessTokenVerifier, TransferTokens
    from app.transfers.steps import SagaSteps

    _wrap_all(PostgresBusinessStore, "db", [
        "get_user", "account_exists", "reserved_today", "check_pin", "claim_transfer_token",
        "reserve_daily_limit", "release_daily_limit", "get_funding_source", "init_facts",
        "confirm_checks", "_confirm_batch", "_read_each", "_write_each", "save_outcome"])
    _wrap_all(AccessTokenVerifier, "jwt.access", ["verify"])
    _wrap_all(TransferTokens, "jwt.transfer", ["issue", "verify"])
    _wrap_all(saga_state.PostgresSagas, "state.sagas", ["get", "due", "purge"])
    _wrap_all(saga_state.PostgresReplies, "state.replies", ["get", "purge"])
    _wrap_all(saga_state.PostgresSagaState, "state", ["flush", "write", "prefetch"])
    _wrap_all(saga_state.PostgresSagaState, "state", ["read_row"])
    _wrap_all(saga_state.StoredSagas, "state.stored", ["saga_of"])
    _wrap_all(SagaEngine, "engine", ["_cycle", "_run_lane", "_route_events", "_send",
                                     "_commit", "_wait_completions", "_write_and_produce",
                                     "_project_transfers"])
    _wrap_all(faust_app.Worker, "send", ["send_all"])
    _wrap_all(SagaSteps, "service", ["apply"])

    original_from_settings = PostgresBusinessStore.from_settings.__func__  # type: ignore[attr-defined]

    def from_settings(cls: type, settings: Any) -> Any:
        store = original_from_settings(cls, settings)
        from sqlalchemy import event

        engine = store.engine.sync_engine

        @event.listens_for(engine, "before_cursor_execute")
        def on_statement(*_args: Any, **_kwargs: Any) -> None:
            _count("sql.statements")
            _count(f"sql.statements:{_current[0]}")

        @event.listens_for(engine.pool, "checkout")
        def on_checkout(*_args: Any, **_kwargs: Any) -> None:
            _count("sql.checkouts")
            _count(f"sql.checkouts:{_current[0]}")

        @event.listens_for(engine, "begin")
        def on_begin(*_args: Any, **_kwargs: Any) -> None:
            _count("sql.transactions")

        return store

    PostgresBusinessStore.from_settings = classmethod(from_settings)  # type: ignore[method-assign,assignment]


def _no_pre_ping() -> None:
    """The business store's engine as ``app.adapters.db.make_engine`` builds it, without
    ``pool_pre_ping`` (which costs BEGIN, a ping and ROLLBACK at every checkout)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    import app.adapters.postgres_store as postgres_store
    from app.adapters.db import server_settings

    original = postgres_store.make_engine

    def make_engine(url: str, schema: str, pool_size: int = 10, **options: Any) -> Any:
        original(url, schema, pool_size)  # validates the schema name
        return create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False,
            hide_parameters=True,
            # The product's session settings (search_path, key_lookups, ...).
            connect_args={"server_settings": server_settings(schema, **options)})

    postgres_store.make_engine = make_engine  # type: ignore[assignment]


def _user_cache() -> None:
    """``get_user`` read once per user and process, then served from memory (UNSAFE: a
    blocked user or a changed threshold is not seen; prices a cached user directory)."""
    from app.adapters.postgres_store import PostgresBusinessStore

    original = PostgresBusinessStore.get_user
    cache: dict[str, Any] = {}

    async def get_user(self: Any, user_id: str) -> Any:
        found = cache.get(user_id)
        if found is None:
            found = cache[user_id] = await original(self, user_id)
        return found

    PostgresBusinessStore.get_user = get_user  # type: ignore[method-assign]


def _short_switch_interval() -> None:
    """The GIL handed over after 0.5 ms instead of 5 ms (Faust's consumer runs in a second
    thread of the worker process)."""
    sys.setswitchinterval(0.0005)


def _gc_timers() -> None:
    """The cyclic collector's passes, timed by generation (``gc.callbacks``). To see them
    with Python's defaults, run the benchmark with ``BIZ_GC_GEN0_THRESHOLD=0``."""
    import gc

    started = [0.0]
    with _lock:  # the callback never adds a key: a snapshot may be iterating them
        for generation in range(3):
            _timers.setdefault(f"gc.gen{generation}", [0, 0.0, 0.0])

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            _record(f"gc.gen{info['generation']}", time.perf_counter() - started[0])

    gc.callbacks.append(callback)


#: Measurement-only variants of the worker (``BENCH_EXPERIMENTS``).
EXPERIMENTS: dict[str, Callable[[], None]] = {
    "no-pre-ping": _no_pre_ping,
    "user-cache": _user_cache,
    "switch-interval": _short_switch_interval,
}


def snapshot() -> dict[str, Any]:
    with _lock:
        return {
            "at": time.time(),
            "timers": {k: list(v) for k, v in _timers.items()},
            "counters": dict(_counters),
        }


def _dump_forever(path: str) -> None:
    tmp = f"{path}.tmp"
    while True:
        time.sleep(DUMP_INTERVAL)
        with open(tmp, "wb") as out:
            out.write(orjson.dumps(snapshot()))
        os.replace(tmp, path)


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots: per timer calls, total, mean and share of the
    wall time; per counter the count."""
    wall = after["at"] - before["at"]
    timers = {}
    for name, (calls, total, peak) in after["timers"].items():
        calls0, total0, _ = before["timers"].get(name, (0, 0.0, 0.0))
        n, seconds = calls - calls0, total - total0
        if n:
            timers[name] = {"calls": int(n), "totalSeconds": round(seconds, 3),
                            "meanMs": round(1000 * seconds / n, 3),
                            "maxMsSinceStart": round(1000 * peak, 2),
                            "shareOfWall": round(seconds / wall, 4) if wall else None}
    counters = {name: n - before["counters"].get(name, 0)
                for name, n in after["counters"].items()
                if n - before["counters"].get(name, 0)}
    return {"wallSeconds": round(wall, 2),
            "timers": dict(sorted(timers.items(), key=lambda kv: -kv[1]["totalSeconds"])),
            "counters": dict(sorted(counters.items()))}


def main() -> int:
    path = os.environ.get("BENCH_TRACE_FILE")
    if not path:
        print("BENCH_TRACE_FILE is not set", file=sys.stderr)
        return 2
    for name in filter(None, os.environ.get("BENCH_EXPERIMENTS", "").split(",")):
        EXPERIMENTS[name]()  # before install(): the timers wrap the variant
    install()
    _gc_timers()
    threading.Thread(target=_dump_forever, args=(path,), name="bench-trace",
                     daemon=True).start()
    from cli.main import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
