"""No record is lost at a rebalance, proven with the window widened on purpose.

faust-streaming 0.15.3 ends a rebalance by resuming the stream partitions, seeking them to
their committed offsets, and only then clearing every stream buffer
(``Recovery.on_recovery_completed``). Records fetched while the seek was under way were put
into a buffer, cleared, and never processed; with Faust's gap bookkeeping the commit then
moved past them. In production the seek takes one round trip per partition (~100 ms under
load); here a fault injected into the worker process only (``sitecustomize`` on its
``PYTHONPATH``, written by this test) makes every seek take 2 s longer, so that a rebalance
under load always has records arriving inside the window. On the code before the fix (commit
c4ba0c0) this test loses requests; the worker must answer every one without being asked again.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import wait_for
from system import System, free_port

pytestmark = pytest.mark.integration

SEEK_DELAY_SECONDS = 2.0

SITECUSTOMIZE = '''
"""Test-only fault injection (tests/integration/test_rebalance_records.py).

Every seek of the worker's consumer to its committed offsets returns
FAULT_DELAY_AFTER_SEEK_SECONDS later, and after such a seek at the end of a rebalance,
until Faust resumes its flow control (which clears the stream buffers) or that end is cut
short, the Faust agents (queries, transfer events) take no new record, as when they are
busy under load: whatever is fetched in that window waits in the stream buffer. (The saga
engine's topics are not Faust's: its group rebalances alongside, under the same load.)"""
import asyncio
import os

_delay = float(os.environ.get("FAULT_DELAY_AFTER_SEEK_SECONDS", "0"))
if _delay > 0:
    from faust.tables import recovery as _recovery
    from faust.transport.drivers import aiokafka as _driver
    from mode.utils import queues as _queues

    from app.record_failures import RecordGuard as _Guard

    _window = {"open": False, "ending": False}
    _seek = _driver.Consumer.seek_to_committed
    _resume = _queues.FlowControlEvent.resume
    _process = _Guard.process

    def _closing(method):
        # The end of a rebalance (Recovery._resume_streams, on_recovery_completed) seeks,
        # then resumes the flow; cut short by the next rebalance (cancelled between the
        # two), it resumes nothing: its window closes when it ends all the same, or the
        # agents would wait for it for ever (and the next revoke for them).
        async def wrapped(self, *args, **kwargs):
            _window["ending"] = True
            try:
                return await method(self, *args, **kwargs)
            finally:
                _window["ending"] = False
                _window["open"] = False
        return wrapped

    _recovery.Recovery._resume_streams = _closing(_recovery.Recovery._resume_streams)
    _recovery.Recovery.on_recovery_completed = _closing(
        _recovery.Recovery.on_recovery_completed)

    async def _slow_seek_to_committed(self):
        committed = await _seek(self)
        # The window of the trap: a seek at the end of a rebalance, before its resume
        # (another seek, e.g. of a fetch while the flow is stopped, is followed by none).
        _window["open"] = _window["ending"]
        await asyncio.sleep(_delay)
        return committed

    def _resume_then_close(self):
        _resume(self)
        _window["open"] = False

    async def _busy_process(self, record, handler, send):
        while _window["open"]:
            await asyncio.sleep(0.01)
        return await _process(self, record, handler, send)

    _driver.Consumer.seek_to_committed = _slow_seek_to_committed
    _queues.FlowControlEvent.resume = _resume_then_close
    _Guard.process = _busy_process  # the Faust agents' path only (the engine's is not)
    print(f"FAULT INJECTION: every seek to committed offsets {_delay} s slower", flush=True)
'''


def _fault_env(tmp: Path) -> dict[str, str]:
    hook = tmp / "fault-injection"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FAULT_DELAY_AFTER_SEEK_SECONDS": str(SEEK_DELAY_SECONDS)}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("rebalance")
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id, tmp)
    sys_.fault_env = _fault_env(tmp)  # type: ignore[attr-defined]
    await sys_.start(worker_env=sys_.fault_env)  # type: ignore[attr-defined]
    try:
        yield sys_
    finally:
        await sys_.close()


async def _group_is(system: System, state: str, members: int) -> bool:
    return await system.group_state() == (state, members)


async def test_every_request_is_answered_once_across_rebalances_with_a_slow_seek(
        system: System) -> None:
    """A second worker joins the group and leaves it (SIGTERM) under a steady stream of
    requests, every seek 2 s slow: each request gets its answer without being sent again,
    and afterwards the group has committed every input record (nothing skipped, nothing
    left behind)."""
    assert system.client is not None
    users = [f"rr{i}" for i in range(6)]
    for u in users:
        await system.add_user(u, balance=100_000)
    first = await system.init(users[0], f"acc-{users[1]}", 100, timeout=120)
    assert first["status"] == "ok", first  # the worker is up
    assert "FAULT INJECTION" in system.log_tail("worker", lines=10_000), "hook not loaded"
    rng = random.Random(20261130)
    done = asyncio.Event()
    sent: list[tuple[str, asyncio.Task[dict[str, Any]]]] = []

    async def ask(kind: str) -> dict[str, Any]:
        payer, payee = rng.sample(users, 2)
        if kind == "transferInit":
            return await system.init(payer, f"acc-{payee}", rng.randrange(1, 500),
                                     timeout=90)
        return await system.call("queryBalance", payer, {}, timeout=90)

    async def load() -> None:
        while not done.is_set():
            kind = rng.choice(["transferInit", "transferInit", "queryBalance"])
            sent.append((kind, asyncio.create_task(ask(kind))))
            await asyncio.sleep(0.05)  # pacing of the load, not synchronisation

    async def join_then_leave() -> None:
        system.start_worker("worker-2", web_port=free_port())
        await wait_for(lambda: _group_is(system, "Stable", 2), timeout=120, interval=0.2,
                       what="the second worker to join")
        # Both workers through their (slow) seek and answering again.
        mark = len(sent)
        await wait_for(lambda: _answered_since(sent, mark, 10), timeout=120,
                       interval=0.2, what="answers after the join")
        await system.stop_process("worker-2")
        await wait_for(lambda: _group_is(system, "Stable", 1), timeout=120, interval=0.2,
                       what="the first worker to take every partition back")
        mark = len(sent)
        await wait_for(lambda: _answered_since(sent, mark, 10), timeout=120, interval=0.2,
                       what="answers after the leave")
        done.set()

    loader = asyncio.create_task(load())
    await join_then_leave()
    await loader
    results = await asyncio.gather(*(task for _kind, task in sent), return_exceptions=True)
    unanswered = [(kind, str(r).splitlines()[0]) for (kind, _t), r in zip(sent, results,
                                                                          strict=True)
                  if isinstance(r, BaseException)]
    assert not unanswered, f"{len(unanswered)} of {len(sent)} unanswered: {unanswered[:5]}"
    for (kind, _t), r in zip(sent, results, strict=True):
        assert isinstance(r, dict) and r["status"] == "ok", (kind, r)
    assert len(sent) >= 100, "too little load to cross the rebalances"

    # Every input record of the run committed, by both of the workers' groups: each
    # reaches each partition's end offset as it was when the last answer came.
    for group, topics in system.worker_groups().items():
        ends = await _offsets(system, topics)
        try:
            await wait_for(lambda g=group, e=ends: _committed_reach(system, g, e),
                           timeout=60, interval=0.5)
        except AssertionError:
            behind = {tp: (done, ends[tp]) for tp, done in
                      (await _offsets(system, topics, group=group)).items()
                      if done < ends[tp]}
            raise AssertionError(f"{group}: input records never committed (committed, "
                                 f"end): {behind}") from None


async def _answered_since(sent: list[tuple[str, asyncio.Task[dict[str, Any]]]], mark: int,
                          count: int) -> bool:
    return sum(1 for _k, t in sent[mark:] if t.done() and not t.exception()) >= count


async def _committed_reach(system: System, group: str, ends: dict[str, int]) -> bool:
    committed = await _offsets(system, list({k.rsplit("[", 1)[0] for k in ends}),
                               group=group)
    return all(committed[tp] >= end for tp, end in ends.items())


async def _offsets(system: System, topics: list[str], *, group: str | None = None
                   ) -> dict[str, int]:
    """topic[partition] -> end offset, or ``group``'s committed offset (0 when none)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    bootstrap = system.settings.kafka_bootstrap_servers
    tps = [TopicPartition(t, p) for t in topics
           for p in range(system.settings.topic_partitions)]
    if group is not None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            metas = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        found = {tp: (m.offset if (m := metas.get(tp)) is not None and m.offset >= 0 else 0)
                 for tp in tps}
    else:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            found = dict(await consumer.end_offsets(tps))
        finally:
            await consumer.stop()
    return {f"{tp.topic}[{tp.partition}]": int(v) for tp, v in found.items()}
