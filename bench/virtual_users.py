"""K virtual users, each doing complete transfers one after the other, as a gateway would:
transferInit → transferConfirm → (verifyOtp with the OTP read from notifications.otp) →
final reply. Closed loop: a user starts its next transfer when the last one ended."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import dataclass

from app.transfers.ids import transfer_id_for
from bench.config import CURRENCY, MIN_AMOUNT_MINOR, OTP_THRESHOLD_MINOR, PIN, BenchConfig
from bench.gateway import BenchGateway
from bench.isolated_system import SeededUser

log = logging.getLogger("bench")

COMPLETED = "COMPLETED"


@dataclass(slots=True)
class TransferSample:
    """One transfer as the gateway saw it. Times are the event loop's clock (seconds)."""

    vu: int
    payer: int
    payee: int
    amount_minor: int
    otp_expected: bool
    #: The payer's user id and the idempotency key: the transfer id derives from them.
    operator_id: str
    key: str
    started_at: float
    init_latency: float | None = None
    confirm_sent_at: float | None = None
    #: transferConfirm → its answer (the final reply, or pending OTP_REQUIRED).
    confirm_latency: float | None = None
    #: OTP_REQUIRED reply → the OTP read from notifications.otp.
    otp_wait: float | None = None
    #: verifyOtp → final reply.
    verify_latency: float | None = None
    #: The headline: transferConfirm → final reply, or verifyOtp → final reply with an OTP.
    final_latency: float | None = None
    finished_at: float | None = None
    #: COMPLETED, an error code, TIMEOUT, or UNFINISHED (cut at the drain deadline).
    outcome: str = "UNFINISHED"
    #: The command whose reply ended the transfer.
    step: str = ""
    otp_used: bool = False

    @property
    def transfer_id(self) -> str:
        """Derived when asked (the checks), not on the load's path: a UUIDv5 (SHA-1)."""
        return transfer_id_for(self.operator_id, self.key)

    @property
    def confirmed(self) -> bool:
        return self.confirm_sent_at is not None


@dataclass
class AmountPlan:
    """Amounts that need an OTP with probability ``otp_share``."""

    otp_share: float

    def draw(self, rng: random.Random) -> tuple[int, bool]:
        if rng.random() < self.otp_share:
            return rng.randint(OTP_THRESHOLD_MINOR + 1, 2 * OTP_THRESHOLD_MINOR), True
        return rng.randint(MIN_AMOUNT_MINOR, OTP_THRESHOLD_MINOR), False


class VirtualUsers:
    def __init__(self, cfg: BenchConfig, gateway: BenchGateway, users: list[SeededUser]
                 ) -> None:
        if len(users) < 2:
            raise ValueError("at least two accounts are needed")
        self.cfg = cfg
        self.gateway = gateway
        self.users = users
        self.plan = AmountPlan(cfg.otp_share)
        self.samples: list[TransferSample] = []
        #: (command type, code) of every error reply and timeout.
        self.errors: Counter[tuple[str, str]] = Counter()
        self.stop_new = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for vu in range(self.cfg.users):
            rng = random.Random(self.cfg.seed * 1_000_003 + vu)
            self._tasks.append(asyncio.create_task(self._run(vu, rng), name=f"vu {vu}"))

    async def drain(self, timeout: float) -> int:
        """Stop starting transfers; wait for those in flight. Returns how many were cut."""
        self.stop_new.set()
        done, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if pending:
            await asyncio.wait(pending)
        return len(pending)

    def failed(self) -> BaseException | None:
        """The exception that ended a virtual user, if any did."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def _run(self, vu: int, rng: random.Random) -> None:
        while not self.stop_new.is_set():
            await self.transfer(vu, rng)

    async def transfer(self, vu: int, rng: random.Random) -> TransferSample:
        n = len(self.users)
        payer_i = rng.randrange(n)
        payee_i = (payer_i + 1 + rng.randrange(n - 1)) % n
        payer, payee = self.users[payer_i], self.users[payee_i]
        amount, otp_expected = self.plan.draw(rng)
        key = f"{rng.getrandbits(128):032x}"  # 128 random bits, as a UUIDv4 has 122
        loop = asyncio.get_running_loop()
        sample = TransferSample(vu, payer_i, payee_i, amount, otp_expected, payer.user_id,
                                key, loop.time())
        self.samples.append(sample)
        gw, timeout = self.gateway, self.cfg.request_timeout
        step = "transferInit"
        try:
            reply, sent, answered = await gw.request(gw.envelope(
                step, payer.user_id, payer.token,
                {"toAccountId": payee.account_id, "amountMinor": amount, "currency": CURRENCY},
            ), timeout)
            sample.init_latency = answered - sent
            if reply["status"] != "ok":
                return self._end(sample, step, reply, answered)
            step = "transferConfirm"
            sample.confirm_sent_at = loop.time()
            reply, sent, answered = await gw.request(gw.envelope(
                step, payer.user_id, payer.token,
                {"transferToken": reply["data"]["transferToken"], "pin": PIN},
                idempotency_key=key,
            ), timeout)
            sample.confirm_latency = answered - sent
            if reply.get("code") != "OTP_REQUIRED":
                sample.final_latency = sample.confirm_latency
                return self._end(sample, step, reply, answered)
            sample.otp_used = True
            step = "otp"
            otp = await gw.otp_for(reply["data"]["transferId"], timeout)
            sample.otp_wait = loop.time() - answered
            step = "verifyOtp"
            reply, sent, answered = await gw.request(gw.envelope(
                step, payer.user_id, payer.token, {"otp": otp}, idempotency_key=key,
            ), timeout)
            sample.verify_latency = sample.final_latency = answered - sent
            return self._end(sample, step, reply, answered)
        except TimeoutError:
            sample.outcome = "TIMEOUT"
            sample.step = step
            self.errors[(step, "TIMEOUT")] += 1
            log.warning("virtual user %d: no answer to %s in %.0fs", vu, step, timeout)
            return sample

    def _end(self, sample: TransferSample, step: str, reply: dict[str, object], at: float
             ) -> TransferSample:
        sample.step = step
        sample.finished_at = at
        if reply.get("status") == "ok":
            sample.outcome = COMPLETED
        else:
            code = str(reply.get("code") or reply.get("status"))
            sample.outcome = code
            self.errors[(step, code)] += 1
        return sample
