"""When does a saga move without a message, and what is forgotten when?

The deadlines of the open sagas (an index per home partition, derived, rebuilt from the
table after a rebalance), the tick that moves the due ones (each on its own: one failing
is retried after a back-off, the others go on), and the purge of what duplicates no
longer need once it is older than the retention window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.domain import transfer_saga as saga_core
from app.domain.ports import ReplyCache, SagaRepository
from app.record_failures import Outbound, describe, is_outage
from app.settings import Settings
from app.transfers.outbound import iso
from app.transfers.steps import SagaSteps

log = logging.getLogger(__name__)

#: The longest a saga whose tick failed waits before it is tried again.
TICK_RETRY_MAX_SECONDS = 60.0


class Deadlines:
    """The deadlines of the open sagas, per home partition: derived, rebuilt by scanning."""

    def __init__(self, sagas: SagaRepository) -> None:
        self.sagas = sagas
        self._index: dict[int, dict[str, float]] = {}

    def of(self, partition: int) -> dict[str, float]:
        index = self._index.get(partition)
        if index is None:
            index = self._index[partition] = {}
            for saga in self.sagas.scan():
                deadline = saga.deadline()
                if saga.transfer.home_partition == partition and deadline is not None:
                    index[saga.transfer.transfer_id] = deadline
        return index

    def saved(self, saga: saga_core.Saga) -> None:
        """A saga was written: its deadline, if its partition's index is built."""
        index = self._index.get(saga.transfer.home_partition)
        if index is not None:
            deadline = saga.deadline()
            if deadline is None:
                index.pop(saga.transfer.transfer_id, None)
            else:
                index[saga.transfer.transfer_id] = deadline

    def forget(self) -> None:
        self._index.clear()


class Timers:
    """The tick of a partition and the purge it runs when due."""

    def __init__(
        self, settings: Settings, sagas: SagaRepository, replies: ReplyCache,
        deadlines: Deadlines, steps: SagaSteps, policy: saga_core.Policy,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.sagas = sagas
        self.replies = replies
        self.deadlines = deadlines
        self.steps = steps
        self.policy = policy
        self.clock = clock
        self._next_purge: dict[int, float] = {}
        self._tick_failures: dict[str, int] = {}

    async def on_tick(self, partition: int) -> list[Outbound]:
        """Every due saga of the partition, each on its own: a saga whose step fails (the
        database is away, a bug) is left exactly as it was, nothing written and nothing to
        send, and tried again after a back-off; the other sagas' steps are written and
        their outputs returned together, so no state is kept whose outputs were dropped."""
        now = self.clock()
        self.purge_if_due(partition, now)  # first: if it fails, no saga has moved yet
        index = self.deadlines.of(partition)
        due = [tid for tid, at in index.items() if at <= now]
        sends: list[Outbound] = []
        for transfer_id in due:
            try:
                saga = self.sagas.get(transfer_id)
                if saga is None:
                    index.pop(transfer_id, None)
                    continue
                new, outputs = saga_core.on_tick(saga, now, self.policy)
                sends.extend(await self.steps.apply(new, outputs, changed=new is not saga))
                self._tick_failures.pop(transfer_id, None)
            except Exception as exc:
                failures = self._tick_failures[transfer_id] = (
                    self._tick_failures.get(transfer_id, 0) + 1)
                delay = min(2.0 ** (failures - 1), TICK_RETRY_MAX_SECONDS)
                index[transfer_id] = now + delay
                log.warning("saga %s: its timer step failed (%s); it is unchanged and tried "
                            "again in %.0fs", transfer_id, describe(exc), delay,
                            exc_info=not is_outage(exc), extra={"transferId": transfer_id})
        return sends

    def purge_if_due(self, partition: int, now: float) -> None:
        """Forget what duplicates no longer need, once it is older than the retention window
        (``BIZ_IDEMPOTENCY_RETENTION_HOURS``, at least 24 h): finished sagas and saved
        replies of this partition. Sagas waiting for operators (MANUAL_REVIEW) stay. After
        that a replayed confirm meets an expired transfer token, and money still cannot
        move twice (the token's single use is recorded in PostgreSQL)."""
        due = self._next_purge.setdefault(
            partition, now + self.settings.purge_interval_seconds)
        if now < due:
            return
        self._next_purge[partition] = now + self.settings.purge_interval_seconds
        horizon = now - self.settings.idempotency_retention_hours * 3600
        old = [saga.transfer.transfer_id for saga in self.sagas.scan()
               if saga.transfer.home_partition == partition
               and saga.state in (saga_core.State.COMPLETED, saga_core.State.FAILED)
               and saga.updated_at < horizon]
        for transfer_id in old:
            self.sagas.delete(transfer_id)
        replies = self.replies.expired(partition, horizon)
        for key in replies:
            self.replies.delete(key)
        if old or replies:
            log.info("partition %s: purged %d finished sagas and %d replies older than %s",
                     partition, len(old), len(replies), iso(horizon))
