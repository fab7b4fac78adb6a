"""What does the worker call for each record it consumes? :class:`TransferService`.

A thin composition: it builds the command side's parts from their collaborators (the
settings, the store, the two tables, the clock, the token verifiers) and gives the agents
one :class:`app.record_failures.Handler` per consumed topic, run through the one
:class:`RecordGuard` (the poison/outage rule). The parts answer one question each:
app/transfers/intake.py (business.commands), commands.py (the handlers), relay.py
(account and funding events), saga_inputs.py (a saga's home partition), timers.py,
steps.py (one step applied) and outbound.py (what is sent).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from app.domain import otp as otp_codes
from app.domain import transfer_saga as saga_core
from app.domain.ports import BusinessStore, GuessBudgets, ReplyCache, SagaRepository
from app.record_failures import Handler, Outbound, Poison, RecordGuard, SourceRecord, describe
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TransferTokens
from app.transfers.commands import CommandHandlers
from app.transfers.handling import Tally
from app.transfers.intake import Intake
from app.transfers.outbound import Outbox
from app.transfers.relay import Relay
from app.transfers.saga_inputs import SagaInputs
from app.transfers.steps import SagaSteps
from app.transfers.timers import Timers
from events.topics import Topics
from schemas.wire import SagaInput

__all__ = ["TransferService"]


def policy_of(settings: Settings) -> saga_core.Policy:
    return saga_core.Policy(
        otp_ttl_seconds=settings.otp_ttl_seconds,
        otp_max_attempts=settings.otp_max_attempts,
        otp_pepper=settings.otp_pepper.get_secret_value().encode(),
        command_timeout_seconds=settings.account_command_timeout_seconds,
        command_max_backoff_seconds=settings.account_command_max_backoff_seconds,
        funding_timeout_seconds=settings.funding_timeout_seconds,
    )


def budgets_of(settings: Settings) -> GuessBudgets:
    return GuessBudgets(
        pin_max_attempts=settings.pin_max_attempts,
        pin_lock_seconds=settings.pin_lock_seconds,
        otp_max_failures=settings.otp_user_max_failures,
        otp_failure_window_seconds=settings.otp_failure_window_seconds,
        otp_max_sends=settings.otp_max_sends,
        otp_send_window_seconds=settings.otp_send_window_seconds,
    )


class TransferService:
    def __init__(
        self,
        settings: Settings,
        store: BusinessStore,
        sagas: SagaRepository,
        replies: ReplyCache,
        *,
        clock: Callable[[], float],
        new_otp: Callable[[], str] = otp_codes.generate_otp,
        access: AccessTokenVerifier | None = None,
        transfer_tokens: TransferTokens | None = None,
        pause: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.store = store
        self.sagas = sagas
        self.replies = replies
        self.clock = clock
        self.access = access or AccessTokenVerifier.from_settings(settings)
        self.transfer_tokens = transfer_tokens or TransferTokens.from_settings(settings)
        self.policy = policy_of(settings)
        self.budgets = budgets_of(settings)
        #: The poison/outage rule of every consumer of the worker (app/record_failures.py).
        self.guard = RecordGuard(dlq_topic=self.topics.dlq,
                                 partitions=settings.topic_partitions, clock=clock, pause=pause)
        tally = Tally()
        #: Records set aside or ignored for what they hold: foreign ids, misrouted inputs.
        self.counters = tally.counters
        self.outbox = Outbox(self.topics, replies, clock)
        self.steps = SagaSteps(store, sagas, replies, self.outbox, self.guard, clock)
        self.timers = Timers(settings, sagas, replies, self.steps, self.policy, clock)
        handlers = CommandHandlers(settings, store, sagas, self.outbox, self.steps,
                                   self.transfer_tokens, self.policy, self.budgets, new_otp,
                                   clock)
        self.intake = Intake(settings, sagas, replies, self.outbox, self.steps,
                             handlers.table(), self.access, self.policy, tally, clock)
        self.relay = Relay(self.outbox, settings.topic_partitions, tally)
        self.inputs = SagaInputs(settings, sagas, self.outbox, self.steps, self.timers,
                                 self.policy, tally, clock, store)
        #: Called with every valid account event before it is relayed (the query tables).
        self.account_event_listeners = self.relay.account_event_listeners
        # One handler per consumed topic: how a record is decided, and answered as poison.
        self.commands = Handler(self.intake.decide, self.intake.poison)
        self.saga_inputs = Handler(self.inputs.decide, self._dead_letter_poison)
        self.account_events = Handler(self.relay.decide_account_event,
                                      self._dead_letter_poison)
        self.funding_events = Handler(self.relay.decide_funding_event,
                                      self._dead_letter_poison)

    async def handle_command(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``business.commands`` record, through the guard (an outage
        retried, poison answered): what the saga engine sends."""
        record = SourceRecord(self.topics.commands, partition, offset, key, raw)
        return await self.guard.decide(record, self.commands)

    async def handle_saga_input(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1, *,
        parsed: SagaInput | None = None,
    ) -> list[Outbound]:
        """The outputs of one ``business.saga-inputs`` record, through the guard.
        ``parsed``: the input as the relay of this process built it (the saga engine's
        in-process hand-over), decided without parsing ``raw`` back."""
        record = SourceRecord(self.topics.saga_inputs, partition, offset, key, raw,
                              parsed=parsed)
        return await self.guard.decide(record, self.saga_inputs)

    def route_account_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``account.events`` record, through the guard."""
        record = SourceRecord(self.topics.account_events, partition, offset, key, raw)
        return self.guard.decide_now(record, self.relay.account_event, self.account_events)

    def route_funding_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``funding.events`` record, through the guard."""
        record = SourceRecord(self.topics.funding_events, partition, offset, key, raw)
        return self.guard.decide_now(record, self.relay.funding_event, self.funding_events)

    def tick(self, partition: int) -> Outbound:
        """The timer's record for ``partition`` of business.saga-inputs."""
        return self.outbox.tick(partition)

    def forget_partitions(self) -> None:
        """After a rebalance: the timers' retry times are forgotten."""
        self.timers.forget()

    def _dead_letter_poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        reason = exc.reason if isinstance(exc, Poison) else f"internal error ({describe(exc)})"
        return [self.outbox.dead_letter(record, reason)]
