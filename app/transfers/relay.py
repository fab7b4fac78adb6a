"""Which partition does an account or funding event go to?

The home partition of the saga whose command it answers, named in the command id
(``<transferId>:<attempt>:<step>:<partition>``). The saga engine runs the relay in its
cycle, for the ``account.events`` and ``funding.events`` records it consumes
(agents/saga_engine.py, ``_route_events``): the saga input made here joins the lane of its
home partition in the same cycle when that engine owns it, and is produced to
``business.saga-inputs`` otherwise. An account event is also handed to the query tables'
listeners first (``AccountProjection`` over the cycle's buffered PostgreSQL rows: read
your writes, docs/architecture.md). Events of other services' commands are normal on the
shared ``account.events`` topic: applied to the query tables, counted, never relayed;
``funding.events`` answers this service only. A relay awaits nothing: a query row the
cycle did not read ahead is not read here, the listener raises
``app.adapters.saga_state.NotReadAhead`` and the engine reads it, then decides the event
again.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from app.domain import transfer_saga as saga_core
from app.record_failures import (
    Outbound,
    Refused,
    SourceRecord,
    decode_json_object,
    validation_reason,
)
from app.transfers.handling import Tally
from app.transfers.ids import ACCOUNT_STEPS, FUNDING_STEPS, is_transfer_id
from app.transfers.outbound import Outbox
from schemas.wire import AccountEvent, FundingEvent, SagaInput


class Relay:
    """account.events and funding.events → business.saga-inputs."""

    def __init__(self, outbox: Outbox, partitions: int, tally: Tally) -> None:
        self.outbox = outbox
        self.partitions = partitions
        self.tally = tally
        #: Called with every valid account event before it is relayed (the query tables).
        self.account_event_listeners: list[Callable[[AccountEvent], object]] = []

    def account_event(self, record: SourceRecord) -> list[Outbound]:
        """Forward an account event to the partition where its saga lives, if it answers a
        command of this service: ``<uuid>:debit|credit|refund:<partition in range>``.
        Events of other services' commands are normal on this shared topic: counted,
        never relayed. One shaped like ours but naming a partition that does not exist is
        dead-lettered."""
        doc = decode_json_object(record.value)
        try:
            event = AccountEvent.model_validate(doc)
        except ValidationError as exc:
            raise Refused("invalid account event: "
                          + validation_reason(exc, name_unknown=True)) from None
        if record.key != event.account_id.encode():
            # Not from the account center (it keys by account): its table writes would land
            # in another partition than the account's, and it answers nothing of ours.
            self.tally.count("miskeyed_account_events")
            raise Refused("the record key is not the event's accountId")
        for listener in self.account_event_listeners:
            listener(event)
        home = self._home_of(event.command_id, ACCOUNT_STEPS, "foreign_account_events")
        if home is None:
            return []
        transfer_id, partition = home
        return [self.outbox.saga_input(
            transfer_id, partition, SagaInput(kind="accountEvent", account_event=event))]

    def funding_event(self, record: SourceRecord) -> list[Outbound]:
        """Forward a funding provider's event to the partition where its top-up lives. The
        topic answers this service only: an event for any other charge id is
        dead-lettered."""
        doc = decode_json_object(record.value)
        try:
            event = FundingEvent.model_validate(doc)
        except ValidationError as exc:
            raise Refused("invalid funding event: "
                          + validation_reason(exc, name_unknown=True)) from None
        home = self._home_of(event.charge_id, FUNDING_STEPS, "foreign_funding_events")
        if home is None:
            raise Refused("not a charge of this service")
        transfer_id, partition = home
        return [self.outbox.saga_input(
            transfer_id, partition, SagaInput(kind="fundingEvent", funding_event=event))]

    async def decide_account_event(self, record: SourceRecord) -> list[Outbound]:
        return self.account_event(record)

    async def decide_funding_event(self, record: SourceRecord) -> list[Outbound]:
        return self.funding_event(record)

    def _home_of(self, command_id: str, steps: frozenset[str], foreign: str
                 ) -> tuple[str, int] | None:
        """``(transferId, home partition)`` of a command id this service issued; None (and
        counted as ``foreign``) for any other; :class:`Refused` when it names a partition
        that does not exist."""
        parsed = saga_core.parse_command_id(command_id)
        if parsed is None or parsed[1] not in steps or not is_transfer_id(parsed[0]):
            self.tally.count(foreign)
            return None
        transfer_id, _step, home = parsed
        if not 0 <= home < self.partitions:
            self.tally.count("out_of_range_ids")
            raise Refused(f"foreign id: it names partition {home}, which does not exist "
                          f"({self.partitions} partitions)")
        return transfer_id, home
