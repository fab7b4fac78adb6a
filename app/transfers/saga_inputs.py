"""What moves a saga on its home partition, besides a command?

Saga inputs: account and funding events (app/transfers/relay.py), decided in the cycle
that read them when the same saga engine owns the saga's home partition, and otherwise
relayed to that partition of ``business.saga-inputs`` by the worker that read them;
operators' resolutions of MANUAL_REVIEW sagas (``bizcenter sagas resolve``), records of
``business.saga-inputs``. Each is checked to belong here before the pure saga decides.
Ticks are not records: the engine runs each home partition's tick itself
(app/transfers/timers.py); a ``{"kind": "tick"}`` record of an earlier version still on the
topic is handled as a tick of its partition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import ValidationError

from app.domain import transfer_saga as saga_core
from app.domain.ports import IdempotencyRecords, SagaRepository
from app.domain.resolution_signing import resolution_signed
from app.record_failures import (
    Outbound,
    Refused,
    SourceRecord,
    decode_json_object,
    validation_reason,
)
from app.settings import Settings
from app.transfers.handling import Tally
from app.transfers.outbound import Outbox
from app.transfers.steps import SagaSteps
from app.transfers.timers import Timers
from schemas.wire import AccountEvent, FundingEvent, OperatorResolution, SagaInput

log = logging.getLogger(__name__)


class SagaInputs:
    """The :class:`app.record_failures.RecordHandler` of ``business.saga-inputs``
    (with :meth:`Outbox.dead_letter` for poison)."""

    def __init__(
        self, settings: Settings, sagas: SagaRepository, outbox: Outbox, steps: SagaSteps,
        timers: Timers, policy: saga_core.Policy, tally: Tally, clock: Callable[[], float],
        outcomes: IdempotencyRecords,
    ) -> None:
        self.sagas = sagas
        self.outcomes = outcomes
        self.outbox = outbox
        self.steps = steps
        self.timers = timers
        self.policy = policy
        self.tally = tally
        self.clock = clock
        self._operator_secret = settings.operator_secret.get_secret_value().encode()

    async def decide(self, record: SourceRecord) -> list[Outbound]:
        item = record.parsed
        if not isinstance(item, SagaInput):  # a record of the topic: untrusted
            item = self._parse(record)
        if item.kind == "tick":
            return await self.timers.on_tick(record.partition)
        if item.kind == "operatorResolution":
            if item.resolution is None:
                raise Refused("invalid saga input: resolution missing")
            return await self._on_resolution(item.resolution, record)
        if item.kind == "fundingEvent":
            if item.funding_event is None:
                raise Refused("invalid saga input: fundingEvent missing")
            return await self._on_funding_event(item.funding_event, record)
        if item.account_event is None:
            raise Refused("invalid saga input: accountEvent missing")
        return await self._on_account_event(item.account_event, record)

    def _parse(self, record: SourceRecord) -> SagaInput:
        doc = decode_json_object(record.value)
        try:
            return SagaInput.model_validate(doc)
        except ValidationError as exc:
            if doc.get("kind") == "operatorResolution":
                self.tally.count("refused_resolutions")  # unsigned, or an operator/reason refused
            raise Refused("invalid saga input: "
                          + validation_reason(exc, name_unknown=True)) from None

    async def _on_resolution(self, resolution: OperatorResolution, record: SourceRecord
                             ) -> list[Outbound]:
        """An operator's resolution of a MANUAL_REVIEW saga (``bizcenter sagas resolve``,
        cli/operator_commands.py), on the saga's home partition. Its signature (HMAC-SHA256
        under BIZ_OPERATOR_SECRET over every field that decides anything) is checked in
        constant time before the saga sees it: without it anyone able to produce to the
        topic could move money out of clearing. A forged one is counted and dead-lettered,
        nothing moves; then the pure saga decides."""
        if not resolution_signed(
                self._operator_secret, resolution.signature,
                transfer_id=resolution.transfer_id, resolution_id=resolution.resolution_id,
                number=resolution.number, action=resolution.action,
                operator=resolution.operator, reason=resolution.reason):
            self.tally.count("refused_resolutions")
            log.error("an operator resolution of %r without a valid signature: refused, "
                      "dead-lettered", resolution.transfer_id,
                      extra={"transferId": resolution.transfer_id})
            raise Refused("operator resolution: invalid signature")
        ids = {"transferId": resolution.transfer_id, "operatorId": resolution.operator}
        saga = await self.sagas.get(resolution.transfer_id)
        if saga is None or saga.transfer.home_partition != record.partition:
            log.warning("resolution of %s ignored: no such saga on partition %s",
                        resolution.transfer_id, record.partition, extra=ids)
            return []
        new, outputs = saga_core.on_resolution(
            saga, resolution.resolution_id, resolution.number, resolution.action,
            resolution.operator, resolution.reason, self.clock(), self.policy)
        if new is saga and not outputs:
            log.warning("resolution %s of %s ignored: the saga is %s", resolution.action,
                        resolution.transfer_id, saga.state.value, extra=ids)
        return await self.steps.apply(new, outputs, changed=new is not saga)

    async def _on_account_event(self, event: AccountEvent, record: SourceRecord
                                ) -> list[Outbound]:
        transfer_id = self._routed_here(event.command_id, record)
        if event.reason == saga_core.COMMAND_ID_CONFLICT:
            # Someone sent one of our command ids with other content: the account center
            # refused it (and alarmed); the id's own event stands. Never a decision.
            self.tally.count("command_id_conflicts")
            log.error("account center refused a command sent with our id %s and other "
                      "content (COMMAND_ID_CONFLICT): ignored", event.command_id)
            return []
        saga = None if transfer_id is None else await self._saga(transfer_id)
        if saga is None:
            return []
        new, outputs = saga_core.on_account_event(
            saga, event.command_id, event.type.value, event.reason, self.clock(), self.policy
        )
        return await self.steps.apply(new, outputs, changed=new is not saga)

    async def _on_funding_event(self, event: FundingEvent, record: SourceRecord
                                ) -> list[Outbound]:
        transfer_id = self._routed_here(event.charge_id, record)
        if transfer_id is None:
            return []
        saga = await self._saga(transfer_id)
        if saga is None:
            if event.status != "captured":
                return []
            return await self._capture_without_saga(event.charge_id, transfer_id, record)
        new, outputs = saga_core.on_funding_event(saga, event.charge_id, event.status,
                                                  self.clock(), self.policy)
        return await self.steps.apply(new, outputs, changed=new is not saga)

    async def _capture_without_saga(self, charge_id: str, transfer_id: str,
                                    record: SourceRecord) -> list[Outbound]:
        """A capture for a top-up whose saga is gone. Its idempotency record (kept beyond
        the saga's purge) tells a COMPLETED top-up of this very charge (attempt included):
        the capture was credited, and this is a replay or a late duplicate (counted,
        ignored). Anything else (no record, another attempt's charge, a top-up that FAILED,
        whose capture may or may not have been given back) goes to operators, saying what
        is known: money may have been taken from a source, and no one may guess."""
        kept = await self.outcomes.outcome_of_transfer(transfer_id)
        if kept is None:
            return [self.outbox.dead_letter(
                record, f"capture {charge_id} for an unknown top-up: give it back to the "
                "source by hand")]
        attempt = ":" + kept.attempt if kept.attempt else ""
        ours = charge_id.startswith(f"{transfer_id}{attempt}:charge:")
        if ours and kept.state == saga_core.State.COMPLETED.value:
            self.tally.count("captures_of_finished_top_ups")
            log.info("capture %s of top-up %s, completed and purged: already credited, "
                     "ignored", charge_id, transfer_id, extra={"transferId": transfer_id})
            return []
        return [self.outbox.dead_letter(
            record, f"capture {charge_id} for top-up {transfer_id}, which ended "
            f"{kept.state or 'unfinished'} ({kept.code or 'no code'}) and is purged"
            + ("" if ours else ", under another attempt")
            + ": check with the provider whether it was given back before acting")]

    def _routed_here(self, command_id: str, record: SourceRecord) -> str | None:
        """The transfer id of a relayed event, if its id names this record's partition:
        the relay sends nothing anywhere else, so any other record was not relayed by
        this service (counted, ignored)."""
        parsed = saga_core.parse_command_id(command_id)
        if parsed is None or parsed[2] != record.partition:
            self.tally.count("misrouted_saga_inputs")
            return None
        return parsed[0]

    async def _saga(self, transfer_id: str) -> saga_core.Saga | None:
        saga = await self.sagas.get(transfer_id)
        if saga is None:
            self.tally.count("unknown_transfer_events")
        return saga
