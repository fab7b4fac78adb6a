"""When does a saga move without a message, and what is forgotten when?

The tick of a home partition moves its sagas whose deadline has come (the repository's
``due``: an index of PostgreSQL), each on its own: one failing is retried after a
back-off, the others go on. It also purges what duplicates no longer need once it is
older than the retention window.
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

#: The most sagas one tick of a partition moves; the rest are due at the next tick.
TICK_MAX_SAGAS = 500


class Timers:
    """The tick of a partition and the purge it runs when due."""

    def __init__(
        self, settings: Settings, sagas: SagaRepository, replies: ReplyCache,
        steps: SagaSteps, policy: saga_core.Policy, clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.sagas = sagas
        self.replies = replies
        self.steps = steps
        self.policy = policy
        self.clock = clock
        self._next_purge: dict[int, float] = {}
        self._tick_failures: dict[str, int] = {}
        #: Sagas whose timer step failed: not tried again before this time.
        self._retry_at: dict[str, tuple[int, float]] = {}  # (home partition, time)

    async def on_tick(self, partition: int) -> list[Outbound]:
        """Every due saga of the partition moved (``each_due``), their outputs together."""
        return [out for outs in await self.each_due(partition) for out in outs]

    async def each_due(self, partition: int) -> list[list[Outbound]]:
        """Every due saga of the partition, each on its own: a saga whose step fails (the
        database is away, a bug) is left exactly as it was, nothing written and nothing to
        send, and tried again after a back-off; the other sagas' steps are written and
        their outputs returned, one list per saga, so no state is kept whose outputs were
        dropped."""
        now = self.clock()
        await self.purge_if_due(partition, now)  # first: if it fails, no saga has moved yet
        due = await self.sagas.due(partition, now, TICK_MAX_SAGAS)
        # A saga whose retry time has passed and that is no longer due (moved by a
        # record meanwhile, or purged) is forgotten.
        due_now = set(due)
        for transfer_id in [t for t, (p, at) in self._retry_at.items()
                            if p == partition and at <= now and t not in due_now]:
            self._retry_at.pop(transfer_id, None)
            self._tick_failures.pop(transfer_id, None)
        sends: list[list[Outbound]] = []
        for transfer_id in due:
            if self._retry_at.get(transfer_id, (partition, 0.0))[1] > now:
                continue
            try:
                saga = await self.sagas.get(transfer_id)
                if saga is None:
                    continue
                new, outputs = saga_core.on_tick(saga, now, self.policy)
                outs = await self.steps.apply(new, outputs, changed=new is not saga)
                if outs:
                    sends.append(outs)
                self._tick_failures.pop(transfer_id, None)
                self._retry_at.pop(transfer_id, None)
            except Exception as exc:
                failures = self._tick_failures[transfer_id] = (
                    self._tick_failures.get(transfer_id, 0) + 1)
                delay = min(2.0 ** (failures - 1), TICK_RETRY_MAX_SECONDS)
                self._retry_at[transfer_id] = (partition, now + delay)
                log.warning("saga %s: its timer step failed (%s); it is unchanged and tried "
                            "again in %.0fs", transfer_id, describe(exc), delay,
                            exc_info=not is_outage(exc), extra={"transferId": transfer_id})
        return sends

    def forget(self) -> None:
        """The partitions changed hands: the retry times of failed sagas are forgotten
        (their new owner starts afresh)."""
        self._tick_failures.clear()
        self._retry_at.clear()

    async def purge_if_due(self, partition: int, now: float) -> None:
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
        sagas = await self.sagas.purge(partition, horizon)
        replies = await self.replies.purge(partition, horizon)
        if sagas or replies:
            log.info("partition %s: purged %d finished sagas and %d replies older than %s",
                     partition, sagas, replies, iso(horizon))
