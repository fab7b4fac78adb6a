"""How is one saga step applied?

All or nothing, in the order that makes a crash between two writes harmless: decide
(pure, done by the caller) → encode and check the outputs → PostgreSQL effects
(idempotent) → the saved replies and the saga table write → the outputs returned to be
sent. A redelivered record finds the saga written (and re-sends what was decided) or not
written (and decides the same thing again: every PostgreSQL effect is idempotent per
transfer and every output id is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from app import saga_telemetry
from app.domain import transfer_saga as saga_core
from app.domain.ports import BusinessStore, ReplyCache, SagaRepository
from app.record_failures import Outbound, RecordGuard
from app.transfers.outbound import Outbox, Saves


class SagaSteps:
    """Applies a saga's step: its effects, its writes, its outputs."""

    def __init__(
        self, store: BusinessStore, sagas: SagaRepository, replies: ReplyCache,
        outbox: Outbox, guard: RecordGuard, clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.sagas = sagas
        self.replies = replies
        self.outbox = outbox
        self.guard = guard
        self.clock = clock

    async def apply(
        self, saga: saga_core.Saga, outputs: Iterable[saga_core.Output], *,
        changed: bool = True, phone: str | None = None,
    ) -> list[Outbound]:
        """One saga's step, all or nothing: its outputs are encoded and checked, then its
        PostgreSQL effects run (idempotent), then its state and saved reply are written and
        its outputs returned. A failure before the writes leaves no trace but the
        idempotent effects, so deciding again (a retry, a redelivery, the next tick) is
        safe; after them nothing can fail."""
        outputs = tuple(outputs)
        if phone is None and any(isinstance(o, saga_core.SendOtp) for o in outputs):
            # An OTP sent again (saga_core.redelivered_outputs): the phone is not stored.
            user = await self.store.get_user(saga.transfer.operator_id)
            phone = user.phone if user is not None else None
        saves: Saves = []
        encoded = list(self.outbox.encode(saga, outputs, phone, saves))
        self.guard.check_outputs(encoded)  # an output that could never be sent: poison
        for output in outputs:  # PostgreSQL effects: idempotent, safe to repeat
            if isinstance(output, saga_core.ReleaseLimit):
                await self.store.release_daily_limit(output.transfer_id)
        if changed and saga.is_final:  # kept beyond the purge (the idempotency record)
            await self.store.save_outcome(saga.transfer.operator_id,
                                          saga.transfer.idempotency_key, saga.state.value,
                                          saga.code)
        for cache_key, value in saves:  # the saga's home partition is the handled record's
            self.replies.put(cache_key, value, at=self.clock(),
                             partition=saga.transfer.home_partition)
        if changed:
            self.sagas.put(saga)
            saga_telemetry.observe(saga, outputs)  # a log line and metrics per state change
        return encoded
