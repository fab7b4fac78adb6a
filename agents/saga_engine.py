"""The saga engine: ``business.commands``, ``business.saga-inputs``, ``account.events`` and
``funding.events`` in batches, in a loop of its own (issue 13, docs/performance.md).

Faust stays the application frame (the app, the query agents, the web views, the CLI); the
saga topics and the events that move sagas leave Faust's per-record machinery (a task, an
event, an ack and a table changelog per record) for a plain aiokafka consumer hosted in the
app as a service. One turn of the loop, a *cycle*:

1. ``getmany``: up to ``saga_batch_max_records`` records of the partitions this worker owns;
   the sagas, saved replies and query rows (accounts', transfers') they will ask for are
   read ahead in one statement;
2. the account and funding events first, in offset order (``_route_events``): an account
   event is applied to its account's query rows (``AccountProjection`` over the rows
   buffered in the cycle), then becomes its saga's input; the input of a saga whose home
   partition this worker owns joins that partition's lane in this very cycle, any other is
   relayed to ``business.saga-inputs`` for the worker that owns it;
3. the records of each partition number (a *lane*: ``business.commands`` p and
   ``business.saga-inputs`` p hold the same sagas) are decided each through the record
   guard (app/record_failures.py: a record that fails for its own sake gets its error
   reply or dead letter and the lane goes on; an outage is waited out, nothing skipped):
   each user's records in offset order, different users' at once (``chain_of``: a record
   whose user is not sure keeps the lane in order); lanes overlap their waits; the lanes
   whose tick is due then move their sagas whose deadline has come (the repository's
   ``due``); every transfer event the cycle will send is applied to its transfer's details
   row (``TransferProjection``, the row homed with its saga);
4. every saga, reply and query row the cycle wrote is sealed (``seal``: exactly the
   cycle's writes, taken between two cycles' decisions) and made durable in ONE
   PostgreSQL transaction (``write``, under the partitions' leases as the seal found them;
   an outage is retried with the same sealed batch, nothing sent before it succeeds; a
   lost lease writes, sends and commits nothing);
5. every output of the cycle is produced without a per-record await, once its write
   succeeded; a record whose outputs could not all be sent goes through the guard's
   ``deliver`` (re-sent, or replaced by its poison outputs);
6. only then are the cycle's offsets committed (in cycle order).

Steps 4-6 run while the next cycle fetches and decides (a pipeline of two cycles: the
worker's thread decides while PostgreSQL writes and the broker acknowledges). The next
cycle reads what this one wrote from the buffer, where the sealed versions stay until
written (then they are remembered as read); it waits for 4-6 of this one to end before
it seals its own, so writes become durable, outputs are sent and offsets committed in
cycle order, and at most one cycle is ever unwritten or unacknowledged. Its decisions may
rest on this cycle's writes before they are durable, as a record's may rest on an earlier
record's of its own cycle: if this write never happens (a crash, a lost lease), neither
does the next one (a lost lease fences the engine, and the next cycle discards what it
decided), and both cycles' records are delivered again.

Why this order is safe under at-least-once delivery: a crash before 4 (this cycle's or the
previous one's) leaves the idempotent
PostgreSQL effects (token claims, reservations, PIN counters) and nothing else, and the
redelivered records are decided again; a crash between 4 and 6 leaves the sagas and query
rows written and their outputs perhaps unsent: a redelivered record finds its saga and
re-sends what it decided (``saga_core.redelivered_outputs``), every output id being
deterministic, so the downstream consumers absorb the duplicates; a redelivered account
event finds its seen mark and changes no row (``AccountProjection``).

Rebalances (aiokafka's listener): a revoke waits for the cycle in flight to end (decided,
written however long the database is away, sent, committed) before the partitions go,
then forgets the cycle's buffer and caches; the Faust
stream buffers of the rebalance trap are not on this path. The topics are assigned by
Kafka's range assignor, which gives a member the same partition numbers of the
co-partitioned ones (the same sagas, the same accounts): a saga, and an account's query
rows, are only ever written by one worker at a time (the leases fence the rest).

Why one module of ~750 lines: the loop, its rebalance listener, the leases and the light
parse that decides which records may run at once answer one question together (when may a
record's effects become durable, be sent and be committed); split, the ordering argument
above would be spread over files that each look safe alone.

Stop: the cycle in flight may finish for ``saga_stop_grace_seconds``, and its tail about as
long again; then what is left is cancelled (the tail too, even a write waiting out an
outage of the database), and the records not committed are delivered again to whoever owns
them next. An exception that escapes the guard (a bug, or a write that is not an outage)
crashes the worker: nothing after it is committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from app.adapters.saga_state import ROW_TABLES, LeaseLost, NotReadAhead, PostgresRows, Sealed
from app.domain import transfer_saga as saga_core
from app.query_service import SEP, TransferProjection
from app.record_failures import (
    BACKOFF_INITIAL_SECONDS,
    BACKOFF_MAX_SECONDS,
    Handler,
    Outbound,
    RecordHandler,
    Refused,
    SourceRecord,
    describe,
    is_outage,
)
from app.settings import Settings
from app.transfers.ids import transfer_id_for
from app.transfers.service import TransferService
from events.fetching import AdaptiveFetch
from events.producing import Record, send_batched
from events.topics import cached_partitioner, partition_of
from schemas.wire import TransferEvent

log = logging.getLogger(__name__)

#: How long ``getmany`` waits for records when there are none (the tick's resolution).
POLL_TIMEOUT_MS = 200

#: The most records of a cycle decided at once (see ``SagaEngine._slots``).
DECIDED_AT_ONCE = 128

#: Producer errors no re-send can cure (the idempotent producer's state is broken).
FATAL_PRODUCER_ERRORS = frozenset({
    "OutOfOrderSequenceNumber", "UnknownProducerId", "InvalidProducerEpoch",
    "ProducerFenced", "InvalidProducerIdMapping",
})


class BatchState(Protocol):
    """The saga state's unit of work (app/adapters/saga_state.py)."""

    async def prefetch(self, transfer_ids: Iterable[str], reply_keys: Iterable[str],
                       rows: Mapping[str, Iterable[str]] | None = None) -> None: ...

    async def read_row(self, table: str, key: str) -> None: ...

    @property
    def rows(self) -> Mapping[str, PostgresRows]: ...

    def read_ahead(self, transfer_id: str) -> saga_core.Saga | None:
        """The saga as this cycle knows it (written or read ahead), without I/O."""
        ...

    def seal(self) -> Sealed: ...

    async def write(self, sealed: Sealed) -> None: ...

    def written(self, sealed: Sealed) -> None: ...

    def forget_reads(self) -> None: ...

    def discard(self) -> None: ...

    async def take_leases(self, partitions: Iterable[int], owner: str) -> dict[int, int]:
        ...


Decided = tuple[SourceRecord, RecordHandler, list[Outbound]]


def saga_group(settings: Settings) -> str:
    """The consumer group of the saga engine (the Faust app's group is ``app_id``)."""
    return f"{settings.app_id}-sagas"


class SagaEngine:
    """The loop of the module docstring. ``start`` after the Faust app is up, ``stop``
    before it stops (agents/worker.py hosts it as a service)."""

    def __init__(
        self, settings: Settings, service: TransferService, state: BatchState, *,
        crash: Callable[[BaseException], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.service = service
        self.topics = service.topics
        self.state = state
        self.crash = crash
        self.clock = clock
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        #: The consumer's fetch setting, following its traffic (events/fetching.py).
        self.fetch: AdaptiveFetch | None = None
        self._task: asyncio.Task[None] | None = None
        self._cycle_lock = asyncio.Lock()
        self._stopping = False
        self._next_tick: dict[int, float] = {}
        #: The last cycle's tail: its write and sends (``_writing``), then its acks and
        #: commit (``_completion``), both overlapping the next cycle's fetch and decisions.
        self._writing: asyncio.Task[list[tuple[int, Any]] | None] | None = None
        self._completion: asyncio.Task[None] | None = None
        #: Who takes the home partitions' leases (app/adapters/saga_state.py).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: A flush was refused for a lost lease: nothing is done until an assignment.
        self._fenced = False
        self._background: set[asyncio.Task[None]] = set()
        #: Records decided at once in a cycle: their PostgreSQL calls wait together, and
        #: the store makes one batch of those waiting together (app/adapters/coalesce.py);
        #: a call it does not batch queues for the pool's connections.
        self._slots = asyncio.Semaphore(DECIDED_AT_ONCE)
        self._account_events = Handler(self._decide_account_event,
                                       service.account_events.poison)
        #: The offsets this engine committed last, per partition (lag metrics, tests).
        self.committed: dict[TopicPartition, int] = {}
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        s = self.settings
        servers = [h.strip() for h in s.kafka_bootstrap_servers.split(",")]
        self.producer = AIOKafkaProducer(
            bootstrap_servers=servers, acks="all", enable_idempotence=True,
            # linger 0: a cycle flushes its outputs at once; waiting would add the linger
            # to every cycle (the batch is the cycle's, not the producer's).
            linger_ms=0, max_batch_size=512 * 1024, partitioner=cached_partitioner)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=servers, group_id=saga_group(s),
            enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=int(s.consumer_session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(s.consumer_heartbeat_interval_seconds * 1000),
            fetch_min_bytes=s.consumer_fetch_min_bytes,
            fetch_max_wait_ms=s.consumer_fetch_max_wait_ms,
            max_poll_records=s.saga_batch_max_records)
        await self.producer.start()
        try:
            await self.consumer.start()
        except BaseException:
            await self.producer.stop()
            raise
        self.consumer.subscribe([self.topics.commands, self.topics.saga_inputs,
                                 self.topics.account_events, self.topics.funding_events],
                                listener=_Rebalance(self))
        self.fetch = AdaptiveFetch(self.consumer, s.consumer_fetch_min_bytes,
                                   s.consumer_fetch_max_wait_ms, time.monotonic)
        self._task = asyncio.create_task(self._run(), name="saga engine")

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            _done, pending = await asyncio.wait(
                [task], timeout=self.settings.saga_stop_grace_seconds + POLL_TIMEOUT_MS / 1000)
            if pending:
                log.warning("the saga engine's cycle did not end within %.1fs: cancelled "
                            "(its records are delivered again)",
                            self.settings.saga_stop_grace_seconds)
                task.cancel()
                await asyncio.wait([task])
        if task is not None and task.done() and not task.cancelled():
            try:
                await asyncio.wait_for(self._wait_completions(),
                                       timeout=self.settings.saga_stop_grace_seconds + 1)
            except TimeoutError:
                log.warning("the last saga cycle was not written or its acks did not come: "
                            "not committed (its records are delivered again)")
        # What is left of the last cycle's tail (a write waiting out an outage of the
        # database, acks the broker does not send) is cancelled, also when the cycle after
        # it was (it waited for that tail): nothing of it is committed, its records come
        # again, and the revoke of the consumer's stop finds no write in flight.
        for tail in (self._completion, self._writing):
            if tail is not None and not tail.done():
                tail.cancel()
                await asyncio.wait([tail])
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and self.failure is None

    def assignment(self) -> set[TopicPartition]:
        try:
            return set(self.consumer.assignment()) if self.consumer is not None else set()
        except Exception:  # not subscribed yet
            return set()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        consumer, fetch = self.consumer, self.fetch
        assert consumer is not None and fetch is not None
        try:
            delay = BACKOFF_INITIAL_SECONDS
            while not self._stopping and self.failure is None:
                try:
                    batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    log.warning("saga records not fetched (%s): again in %.1fs",
                                describe(exc), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                    continue
                delay = BACKOFF_INITIAL_SECONDS
                fetch.read(sum(len(records) for records in batch.values()))
                async with self._cycle_lock:
                    await self._cycle(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = exc
            log.critical("the saga engine failed: crashing the worker (every record not "
                         "committed is delivered again)", exc_info=True)
            await self.crash(exc)

    async def _cycle(self, batch: dict[TopicPartition, list[Any]]) -> None:
        lanes: dict[int, list[tuple[SourceRecord, RecordHandler]]] = defaultdict(list)
        events: list[tuple[SourceRecord, RecordHandler]] = []
        offsets: dict[TopicPartition, int] = {}
        handlers = {self.topics.commands: self.service.commands,
                    self.topics.saga_inputs: self.service.saga_inputs,
                    self.topics.account_events: self._account_events,
                    self.topics.funding_events: self.service.funding_events}
        for tp, records in sorted(batch.items()):
            if not records:
                continue
            handler = handlers[tp.topic]
            into = (lanes[tp.partition] if tp.topic in (self.topics.commands,
                                                         self.topics.saga_inputs)
                    else events)
            for r in records:
                into.append((SourceRecord(tp.topic, tp.partition, r.offset, r.key, r.value),
                             handler))
            offsets[tp] = records[-1].offset + 1
        ticks = self._ticks_due()
        if not lanes and not events and not ticks:
            return
        self.state.forget_reads()
        await self._prefetch([*lanes.values(), events])
        decided = await self._route_events(events, lanes) if events else []
        results = await asyncio.gather(*(
            self._run_lane(lanes.get(p, []), p if p in ticks else None)
            for p in sorted(set(lanes) | ticks)))
        decided += [d for lane_result in results for d in lane_result]
        await self._project_transfers(decided)
        # The previous cycle's write, sends, acks and commit overlapped this cycle's fetch
        # and decisions (which read its writes from the buffer until they are written);
        # they end before anything of this cycle is written or sent, so writes are made
        # durable in cycle order, at most one cycle is ever unwritten or unacknowledged,
        # and outputs re-sent after a failed ack never come after a later cycle's (a
        # revoke or a stop waits for the last one too).
        await self._wait_completions()
        if self._fenced:
            # Another worker took some of these partitions (this one lost them during an
            # outage; the previous cycle's write found it): nothing of this cycle is
            # written, sent or committed; their new owner reads the records again.
            # Nothing more is done until partitions are assigned.
            self.state.discard()
            return
        # Sealed now, between two cycles' decisions: exactly this cycle's writes (and
        # any the previous cycles left), never half of a record's.
        sealed = self.state.seal()
        writing = asyncio.create_task(self._write_and_produce(sealed, decided),
                                      name="saga cycle write")
        self._writing = writing
        self._completion = asyncio.create_task(
            self._complete(writing, decided, offsets), name="saga cycle completion")

    async def _prefetch(self, lanes: Iterable[list[tuple[SourceRecord, RecordHandler]]]
                        ) -> None:
        """Read the sagas and saved replies the cycle's records will ask for, in one
        statement (a guess from a light parse: a record guessed wrong, or not at all, is
        read when asked). A failure here is no reason to wait or to stop: the records'
        own reads meet it inside the guard."""
        transfer_ids: set[str] = set()
        reply_keys: set[str] = set()
        rows: dict[str, set[str]] = {table: set() for table in ROW_TABLES}
        for lane in lanes:
            for record, _handler in lane:
                if record.topic == self.topics.account_events:
                    account_keys_of(record, transfer_ids, rows)
                elif record.topic == self.topics.funding_events:
                    funding_keys_of(record, transfer_ids)
                else:
                    keys_of(record, self.topics.commands, transfer_ids, reply_keys)
        # A transfer id PostgreSQL cannot hold is none of ours (its record is refused when
        # decided): it is not asked for.
        transfer_ids = {k for k in transfer_ids if "\x00" not in k}
        rows["query_transfers"] = transfer_ids  # a saga's details row goes with it
        if not transfer_ids and not reply_keys and not any(rows.values()):
            return
        try:
            await self.state.prefetch(transfer_ids, reply_keys, rows)
        except Exception as exc:
            # Only a guess: whatever it met (an outage, a key refused) the records meet
            # again when they ask, inside the guard.
            log.debug("prefetch skipped (%s)", describe(exc))

    async def _route_events(self, events: list[tuple[SourceRecord, RecordHandler]],
                            lanes: dict[int, list[tuple[SourceRecord, RecordHandler]]]
                            ) -> list[Decided]:
        """The cycle's account and funding events, in offset order per partition: each
        applied to the account query tables (account events) and turned into its saga's
        input. The input of a saga whose home partition this worker owns joins that
        partition's lane in this very cycle (no hop through ``business.saga-inputs``: its
        effects are written in the cycle's transaction and its record committed after);
        any other is relayed to ``business.saga-inputs``, for the worker that owns it."""
        guard = self.service.guard
        homes = {tp.partition for tp in self.assignment()
                 if tp.topic == self.topics.saga_inputs}
        decided: list[Decided] = []
        for record, handler in events:
            async with self._slots:
                outs = await guard.decide(record, handler)
            relayed = []
            for out in outs:
                home = out.partition
                if out.topic == self.topics.saga_inputs and home is not None and home in homes:
                    # Handed over as built (``parsed``: the relay's validated model),
                    # not parsed back from its bytes; a dead letter of it points at the
                    # event it was made from (``origin``).
                    lanes[home].append((SourceRecord(out.topic, home, -1, out.key, out.value,
                                                     parsed=out.model, origin=record),
                                        self.service.saga_inputs))
                else:
                    relayed.append(out)
            decided.append((record, handler, relayed))
        return decided

    async def _decide_account_event(self, record: SourceRecord) -> list[Outbound]:
        """An account event: refused unless it is on its key's partition (the account
        center keys by account and names no partition: the account's tables are written
        only by the owner of that partition) and its key is free of the tables' separator
        (a row's home partition is its account's, read from the key), then the relay
        (app/transfers/relay.py),
        which applies it to the account query tables first; a table row not read ahead is
        read, and the event decided again (the projection reads before it writes)."""
        if record.key is not None and partition_of(
                record.key, self.settings.topic_partitions) != record.partition:
            self.service.relay.tally.count("miskeyed_account_events")
            raise Refused("the record is not on the partition of its key")
        if record.key is not None and SEP.encode() in record.key:
            # The relay accepts only an event keyed by its accountId: this one's id holds
            # the tables' separator, which would make its rows another account's.
            raise Refused("the accountId holds U+001F, the query tables' separator")
        while True:
            try:
                return self.service.relay.account_event(record)
            except NotReadAhead as miss:
                await self.state.read_row(miss.table, miss.key)

    async def _project_transfers(self, decided: Sequence[Decided]) -> None:
        """Every transfer event the cycle will send, applied to the transfers' details rows
        (``TransferProjection``), homed with their saga (the lane's partition), written in
        the cycle's flush: a transfer's details are as current as its saga, committed
        before any reply of the cycle is sent. A row not read ahead is read and the event
        applied again (the projection reads before it writes)."""
        topic = self.topics.transfer_events
        view = self.state.rows["query_transfers"]
        for record, _handler, outs in decided:
            for out in outs:
                if out.topic != topic:
                    continue
                projection = TransferProjection(view.at(record.partition))
                while True:
                    try:
                        if isinstance(out.model, TransferEvent):  # as the outbox built it
                            projection.apply(out.model)
                        else:
                            projection.apply_raw(out.value)
                        break
                    except NotReadAhead as miss:
                        await self._waiting_out("a query row could not be read",
                                                functools.partial(self.state.read_row,
                                                                  miss.table, miss.key))

    def _ticks_due(self) -> set[int]:
        """The home partitions (``business.saga-inputs`` partitions owned) whose tick is due."""
        now = self.clock()
        due = set()
        for tp in self.assignment():
            if tp.topic != self.topics.saga_inputs:
                continue
            if self._next_tick.get(tp.partition, 0.0) <= now:
                due.add(tp.partition)
                self._next_tick[tp.partition] = now + self.settings.tick_interval_seconds
        return due

    async def _run_lane(self, records: Sequence[tuple[SourceRecord, RecordHandler]],
                        tick: int | None) -> list[Decided]:
        """The records of one partition number: each user's records one after the other,
        in offset order, different users' at once (their PostgreSQL waits overlap); then
        the partition's tick, if due. The decisions come back in offset order.

        Why per user and not per saga: two sagas of one user share the user's state (the
        PIN's budget, the daily limits, the transfer token's single use), so their records
        keep the partition's order, and every outcome is the one offset order gives;
        different users share nothing in the business center, as different partitions
        never did."""
        guard = self.service.guard
        chains: dict[str, list[int]] = defaultdict(list)
        for i, (record, _handler) in enumerate(records):
            chains[self._chain_of(record)].append(i)
        if EVERY_SAGA in chains:  # a record that may touch any saga: the lane in order
            chains = {EVERY_SAGA: list(range(len(records)))}
        results: list[Decided | None] = [None] * len(records)

        async def run_chain(indexes: list[int]) -> None:
            for i in indexes:
                record, handler = records[i]
                async with self._slots:
                    results[i] = (record, handler, await guard.decide(record, handler))

        if len(chains) == 1:
            await run_chain(next(iter(chains.values())))
        else:
            await asyncio.gather(*(run_chain(chain) for chain in chains.values()))
        decided = [d for d in results if d is not None]
        if tick is not None:
            record = SourceRecord(self.topics.saga_inputs, tick, -1, None, b"")
            try:
                moved = await self.service.timers.each_due(tick)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # The purge could not run (the database is away): no saga moved; the next
                # tick comes.
                log.warning("tick of partition %s not run (%s)", tick, describe(exc))
            else:
                # Each saga's outputs apart: one refused output costs only its saga's.
                decided.extend((record, self.service.saga_inputs, outs) for outs in moved)
        return decided

    def _chain_of(self, record: SourceRecord) -> str:
        """The user a record acts for (``user:<id>``): a command's operator, or the owner
        of the saga a saga input moves, as read ahead (no I/O here); otherwise
        ``EVERY_SAGA`` (no such saga read, perhaps created by a command of this cycle,
        whose user this record cannot tell) or the record's own key (``chain_of``)."""
        chain = chain_of(record, self.topics.commands)
        if not chain.startswith("transfer:"):
            return chain
        saga = self.state.read_ahead(chain.removeprefix("transfer:"))
        return f"user:{saga.transfer.operator_id}" if saga is not None else EVERY_SAGA

    async def _write_and_produce(self, sealed: Sealed, decided: Sequence[Decided]
                                 ) -> list[tuple[int, Any]] | None:
        """The cycle's sagas, replies and query rows in one transaction (an outage is
        waited out, the same sealed batch written again), then every output handed to the
        producer; the futures of their acks. None when the write was refused, a lease of
        the cycle's partitions lost: nothing sent, and the engine fenced (the next cycle
        discards what it decided over this one)."""
        try:
            await self._waiting_out("the saga state could not be written",
                                    functools.partial(self.state.write, sealed))
        except LeaseLost as exc:
            log.warning("saga cycle not written: %s; its records go to their new owner", exc)
            self._fenced = True
            return None
        self.state.written(sealed)
        return await self._produce(decided)

    async def _waiting_out(self, what: str, call: Callable[[], Awaitable[None]]) -> None:
        """``call`` until it succeeds: an outage is waited out with back-off (nothing of
        the cycle is written or sent meanwhile), anything else raised."""
        delay = BACKOFF_INITIAL_SECONDS
        while True:
            try:
                await call()
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning("%s (%s): again in %.1fs", what, describe(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _produce(self, decided: Sequence[Decided]) -> list[tuple[int, Any]]:
        """Every output handed to the producer without waiting for its ack, one batch per
        topic-partition (events/producing.py: order kept per partition; the wait only
        when the producer's buffer is full or a topic's metadata is unknown); the
        futures of their acks (one per batch, shared by its outputs), by the index of
        the record they belong to. An output refused at once has a failed future."""
        producer = self.producer
        assert producer is not None
        owners = [i for i, (_record, _handler, outs) in enumerate(decided) for _out in outs]
        futures = await send_batched(producer, [
            Record(out.topic, out.key, out.value, out.partition)
            for _record, _handler, outs in decided for out in outs])
        return list(zip(owners, futures, strict=True))

    async def _complete(self, writing: asyncio.Task[list[tuple[int, Any]] | None],
                        decided: Sequence[Decided],
                        offsets: dict[TopicPartition, int]) -> None:
        """A cycle's end: written and sent (``writing``; refused: nothing more), its
        outputs acknowledged (a record whose outputs could not all be sent goes through
        the guard's ``deliver``), then its offsets committed. The previous cycle's ended
        before this one was sealed."""
        try:
            acks = await writing
            if acks is None:
                return
            await self._send(decided, acks)
            if offsets:
                await self._commit(offsets)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
                log.critical("a saga cycle could not complete: crashing the worker (every "
                             "record not committed is delivered again)", exc_info=True)
                await self.crash(exc)
            raise

    async def _wait_completions(self) -> None:
        """Until the last cycle is written, its outputs acknowledged and its offsets
        committed."""
        task = self._completion
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def _wait_written(self) -> None:
        """Until the last cycle is written (an outage waited out) and its outputs handed
        to the producer, or its write refused."""
        task = self._writing
        if task is not None and not task.done():
            await asyncio.wait([task])

    async def _send(self, decided: Sequence[Decided], acks: list[tuple[int, Any]]) -> None:
        """Wait for the acks of every output; re-send what failed."""
        futures = acks
        if not futures:
            return
        # One future per batch, shared by its outputs (gather waits for each once and
        # gives its result at every place).
        results = await asyncio.gather(*(f for _i, f in futures), return_exceptions=True)
        fatal = next((r for r in results if isinstance(r, BaseException)
                      and type(r).__name__ in FATAL_PRODUCER_ERRORS), None)
        if fatal is not None:
            # The idempotent producer's sequence is broken for good: every later send to
            # that partition would fail too. Crash: the restart gets a new producer, and
            # the cycle's records, not committed, come again.
            raise fatal
        failed = sorted({i for (i, _f), r in zip(futures, results, strict=True)
                         if isinstance(r, BaseException)})
        for i in failed:
            record, handler, outs = decided[i]
            await self.service.guard.deliver(record, outs, handler, self._send_now)

    async def _send_now(self, outs: Iterable[Outbound]) -> None:
        producer = self.producer
        assert producer is not None
        futures = [await producer.send(out.topic, out.value, key=out.key,
                                       partition=out.partition) for out in outs]
        for fut in futures:
            await fut

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self.consumer
        assert consumer is not None
        try:
            await consumer.commit(offsets)
        except Exception as exc:
            # The partitions went to another member meanwhile (a session that expired
            # during an outage), or the broker is away: the records are read again from
            # the last commit, and everything of this cycle is idempotent. Anything else
            # (an authorization refused, a bug) is an error an operator must see.
            expected = is_outage(exc) or type(exc).__name__ in (
                "CommitFailedError", "IllegalStateError")
            log.log(logging.WARNING if expected else logging.ERROR,
                    "offsets of the saga topics not committed (%s): the records come again",
                    describe(exc), exc_info=not expected)
            return
        self.committed.update(offsets)

    async def _take_leases_of(self, assigned: Iterable[TopicPartition]) -> None:
        await self._take_leases({tp.partition for tp in assigned
                                 if tp.topic != self.topics.funding_events})

    async def _take_leases(self, partitions: set[int]) -> None:
        """Before any record of a new assignment: the leases of its home partitions (a
        worker that had them and lost them during an outage can no longer write them).
        An outage is waited out: nothing of these partitions may be decided before."""
        delay = BACKOFF_INITIAL_SECONDS
        while not self._stopping:
            try:
                leases = await self.state.take_leases(partitions, self.owner)
            except Exception as exc:
                log.warning("saga partition leases not taken (%s): again in %.1fs",
                            describe(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                continue
            self._fenced = False
            log.info("saga partition leases taken: %s", leases)
            return

    def seed_committed(self, assigned: set[TopicPartition]) -> None:
        """Learn the group's committed offsets of newly assigned partitions, in the
        background (the lag metric: a partition is not "everything behind" only because
        this process has not committed it yet)."""
        for tp in list(self.committed):
            if tp not in assigned:
                del self.committed[tp]
        new = [tp for tp in assigned if tp not in self.committed]
        if new and self.consumer is not None:
            task = asyncio.create_task(self._read_committed(new), name="saga committed")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _read_committed(self, tps: list[TopicPartition]) -> None:
        consumer = self.consumer
        assert consumer is not None
        for tp in tps:
            try:
                offset = await consumer.committed(tp)
            except Exception as exc:  # only a metric: the next commit tells
                log.debug("committed offset of %s not read (%s)", tp, describe(exc))
                continue
            self.committed.setdefault(tp, offset if offset is not None else 0)

    async def _revoked(self) -> None:
        async with self._cycle_lock:  # the cycle in flight ends: decided,
            # then written and sent, however long an outage of the database lasts (its
            # sealed batch must not be written after the partitions went), ...
            await self._wait_written()
            try:  # ... then acknowledged and committed, if the broker answers in time
                await asyncio.wait_for(asyncio.shield(self._wait_completions()),
                                       timeout=self.settings.consumer_session_timeout_seconds)
            except TimeoutError:
                # Its acks do not come (the broker is away): the partitions go without its
                # commit; their next owner reads its records again (every effect of a
                # cycle is idempotent, every output id deterministic).
                log.warning("the last saga cycle's acks did not come before the revoke: "
                            "its records are delivered again")
            self.state.discard()
            self.service.forget_partitions()
            self._next_tick.clear()


#: The saga key of a record that may touch every saga of its partition (a tick record).
EVERY_SAGA = "*"


def chain_of(record: SourceRecord, commands_topic: str) -> str:
    """Whose state a record's decision touches, read the way the handlers read it, or
    ``EVERY_SAGA`` when a light parse cannot be sure: ``user:<operatorId>`` for a command
    (a command only touches its operator's sagas and state); ``transfer:<id>`` for a saga
    input that moves one saga (its user is the saga's); a key of its own for a value that
    is not a JSON object (refused by the handler before it reads anything). The wire
    models also accept snake_case names (``populate_by_name``): a record using them, a
    tick, an unknown kind, anything unreadable here keeps its partition's order."""
    try:
        doc = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        return f"record:{record.topic}:{record.offset}"
    if not isinstance(doc, dict):
        return f"record:{record.topic}:{record.offset}"
    if record.topic == commands_topic:
        operator = doc.get("operatorId")
        if "operator_id" in doc or not isinstance(operator, str):
            return EVERY_SAGA
        return f"user:{operator}"
    if "account_event" in doc or "funding_event" in doc:
        return EVERY_SAGA
    kind = doc.get("kind")
    field, id_field, snake = {
        "accountEvent": ("accountEvent", "commandId", "command_id"),
        "fundingEvent": ("fundingEvent", "chargeId", "charge_id"),
        "operatorResolution": ("resolution", "transferId", "transfer_id"),
    }.get(kind if isinstance(kind, str) else "", ("", "", ""))
    inner = doc.get(field) if field else None
    if not isinstance(inner, dict) or snake in inner or not isinstance(
            inner.get(id_field), str):
        return EVERY_SAGA
    value: str = inner[id_field]
    if kind == "operatorResolution":
        return f"transfer:{value}"
    try:
        parsed = saga_core.parse_command_id(value)
    except ValueError:  # e.g. a partition of more digits than int() reads
        return EVERY_SAGA
    return EVERY_SAGA if parsed is None else f"transfer:{parsed[0]}"


def keys_of(record: SourceRecord, commands_topic: str, transfer_ids: set[str],
            reply_keys: set[str]) -> None:
    """Add the saga and reply keys a record will likely read: a command's saved reply
    (``operatorId ␟ requestId``) and saga (its scoped idempotency key); a saga input's saga
    (from its command or charge id, or the resolution's transfer id). Anything unreadable
    adds nothing."""
    doc = _json_object(record.value)
    if doc is None:
        return
    if record.topic == commands_topic:
        operator, request, idem = (doc.get("operatorId"), doc.get("requestId"),
                                   doc.get("idempotencyKey"))
        if isinstance(operator, str) and isinstance(request, str):
            reply_keys.add(f"{operator}\x1f{request}")
        if isinstance(operator, str) and isinstance(idem, str):
            transfer_ids.add(transfer_id_for(operator, idem))
        return
    for field, id_field in (("accountEvent", "commandId"), ("fundingEvent", "chargeId")):
        inner = doc.get(field)
        if isinstance(inner, dict) and isinstance(inner.get(id_field), str):
            _add_transfer_named(inner[id_field], transfer_ids)
            return
    resolution = doc.get("resolution")
    if isinstance(resolution, dict) and isinstance(resolution.get("transferId"), str):
        transfer_ids.add(resolution["transferId"])


def account_keys_of(record: SourceRecord, transfer_ids: set[str],
                    rows: dict[str, set[str]]) -> None:
    """Add the keys an ``account.events`` record will likely read: its account's balance
    row and its seen mark, and the saga its command id names. Anything unreadable adds
    nothing."""
    doc = _json_object(record.value)
    account, command = (None, None) if doc is None else (doc.get("accountId"),
                                                          doc.get("commandId"))
    if not isinstance(account, str) or not isinstance(command, str):
        return
    rows["query_balances"].add(account)
    rows["query_events_seen"].add(f"{account}{SEP}{command}")
    _add_transfer_named(command, transfer_ids)


def funding_keys_of(record: SourceRecord, transfer_ids: set[str]) -> None:
    """Add the top-up a ``funding.events`` record's charge id names. Anything unreadable
    adds nothing."""
    doc = _json_object(record.value)
    charge = None if doc is None else doc.get("chargeId")
    if isinstance(charge, str):
        _add_transfer_named(charge, transfer_ids)


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    """The record's value as a JSON object, or None (not JSON, or not an object)."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _add_transfer_named(command_id: str, transfer_ids: set[str]) -> None:
    """Add the transfer a command or charge id of this service names (none for another
    service's id, or one ``int()`` cannot read: a partition of thousands of digits)."""
    try:
        parsed = saga_core.parse_command_id(command_id)
    except ValueError:
        return
    if parsed is not None:
        transfer_ids.add(parsed[0])


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, engine: SagaEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.engine._revoked()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("saga partitions assigned: %s",
                 sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        # The leases of the partition numbers whose rows this engine writes: home
        # partitions (commands, saga inputs) and accounts' (account.events), all
        # co-partitioned (events/topics.py checks their counts). funding.events is the
        # provider's, of any partition count: its numbers name nobody's rows, and leasing
        # them would take leases another worker holds.
        await self.engine._take_leases_of(assigned)
        self.engine.seed_committed(set(assigned))
