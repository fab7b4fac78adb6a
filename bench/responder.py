"""A trivial stand-in for the business center, to measure the load generator on its own
(``bench/loadgen_alone.py``).

One process, one consumer (a consumer group) on ``business.commands`` and one producer
(the worker's settings: ``acks=all``, idempotent, ``linger_ms=2``). Every command gets a
well-formed reply of about the real size on ``business.replies`` (keyed by requestId), and
the other records the gateway reads, in about the real numbers: an OTP notification on
``notifications.otp`` for a confirm above the OTP threshold, and ``business.transfer-events``
(3 per transfer, 4 with an OTP step; the worker writes ~3.1). No checks, no state: the
transfer id is derived as the worker derives it (``app.transfers.ids``), the OTP is fixed.

``python -m bench.responder --bootstrap ... --prefix P --group G`` runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app import collector
from app.event_loop import install_event_loop
from app.transfers.ids import transfer_id_for
from bench.config import OTP_THRESHOLD_MINOR
from bench.echo import SERVER_PRODUCER_OPTIONS

OTP = "246810"
#: A transfer token of about the real size (a JWT of the worker's claims); the stand-in's
#: carries the amount in its last 12 characters, so the confirm knows whether it needs an OTP.
TOKEN_PREFIX = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + "x" * 260 + "." + "y" * 31


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Responder:
    def __init__(self, prefix: str) -> None:
        self.replies = f"{prefix}business.replies"
        self.otps = f"{prefix}notifications.otp"
        self.events = f"{prefix}business.transfer-events"
        #: Amounts of transfers waiting for their verifyOtp (to write their events).
        self.amounts: dict[str, int] = {}

    def answer(self, command: dict[str, Any]) -> list[tuple[str, bytes, bytes]]:
        """(topic, key, value) of every record a command gets."""
        kind, rid = command.get("type"), str(command.get("requestId"))
        operator, key = str(command.get("operatorId")), command.get("idempotencyKey")
        payload = command.get("payload") or {}
        out: list[tuple[str, bytes, bytes]] = []
        reply: dict[str, Any] = {"requestId": rid, "type": kind, "status": "ok"}
        if key is not None:
            reply["idempotencyKey"] = key
        if kind == "transferInit":
            amount = int(payload.get("amountMinor") or 0)
            reply["data"] = {"transferToken": f"{TOKEN_PREFIX}{amount:012d}",
                             "expiresAt": _now(),
                             "amountMinor": payload.get("amountMinor"), "currency": "USD"}
        elif kind in ("transferConfirm", "verifyOtp"):
            tid = transfer_id_for(operator, str(key))
            if kind == "transferConfirm":
                amount = int(str(payload.get("transferToken", ""))[-12:] or 0)
            else:
                amount = self.amounts.pop(tid, 0)
            if kind == "transferConfirm" and amount > OTP_THRESHOLD_MINOR:
                self.amounts[tid] = amount
                reply.update(status="pending", code="OTP_REQUIRED",
                             message="an OTP was sent to the payer's phone",
                             data={"transferId": tid, "state": "OTP_PENDING"})
                out.append((self.otps, operator.encode(), orjson.dumps({
                    "userId": operator, "phone": "+15550000000", "otp": OTP,
                    "expiresAt": _now(), "transferId": tid})))
                out.extend(self._events(tid, operator, amount, ["OTP_PENDING"], 1))
            else:
                reply["data"] = {"transferId": tid, "state": "COMPLETED",
                                 "amountMinor": amount, "currency": "USD",
                                 "completedAt": _now()}
                first = 2 if kind == "verifyOtp" else 1
                out.extend(self._events(tid, operator, amount,
                                        ["DEBITING", "CREDITING", "COMPLETED"], first))
        else:
            reply.update(status="error", code="UNSUPPORTED", message=f"{kind}")
        out.append((self.replies, rid.encode(), orjson.dumps(reply)))
        return out

    def _events(self, tid: str, operator: str, amount: int, states: list[str],
                first_seq: int) -> list[tuple[str, bytes, bytes]]:
        out = []
        previous = None
        for i, state in enumerate(states):
            seq = first_seq + i
            out.append((self.events, tid.encode(), orjson.dumps({
                "eventId": f"{tid}:{seq}", "transferId": tid, "seq": seq, "state": state,
                "operatorId": operator, "fromAccountId": "acc-from", "toAccountId": "acc-to",
                "amountMinor": amount, "currency": "USD", "occurredAt": _now(),
                "previousState": previous})))
            previous = state
        return out


async def serve(bootstrap: str, prefix: str, group: str, stop: asyncio.Event) -> None:
    responder = Responder(prefix)
    consumer = AIOKafkaConsumer(f"{prefix}business.commands", bootstrap_servers=bootstrap,
                                group_id=group, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **SERVER_PRODUCER_OPTIONS)
    await producer.start()
    await consumer.start()
    failures = 0

    def delivered(fut: asyncio.Future[Any]) -> None:
        nonlocal failures
        if not fut.cancelled() and fut.exception() is not None:
            failures += 1
            print(f"responder: not delivered: {fut.exception()!r}", file=sys.stderr)

    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for records in batches.values():
                for record in records:
                    try:
                        command = orjson.loads(record.value or b"{}")
                    except orjson.JSONDecodeError:
                        continue
                    for topic, key, value in responder.answer(command):
                        # Enqueued, not awaited: the producer batches (as the worker's does).
                        fut = await producer.send(topic, value, key=key)
                        fut.add_done_callback(delivered)
        await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.responder", description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    install_event_loop(args.event_loop)
    collector.settle(collector.DEFAULT_GEN0)  # as the business center's processes do

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.bootstrap, args.prefix, args.group, stop)

    asyncio.run(run())
    return 0


def command(bootstrap: str, prefix: str, group: str, event_loop: str = "uvloop"
            ) -> list[str]:
    return [sys.executable, "-m", "bench.responder", "--bootstrap", bootstrap, "--prefix",
            prefix, "--group", group, "--event-loop", event_loop]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
