"""One-time passwords for the step-up of large transfers.

Six random digits from ``secrets``; only a keyed hash bound to the transfer (its id, amount,
payee and idempotency key) is ever stored, so a leaked state table reveals no OTP and an OTP
of one transfer cannot confirm another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

OTP_DIGITS = 6


def generate_otp() -> str:
    return f"{secrets.randbelow(10**OTP_DIGITS):0{OTP_DIGITS}d}"


def otp_binding(transfer_id: str, amount_minor: int, to_account_id: str, idem_key: str) -> str:
    return f"{transfer_id}\x1f{amount_minor}\x1f{to_account_id}\x1f{idem_key}"


def otp_digest(pepper: bytes, binding: str, otp: str) -> str:
    return hmac.new(pepper, f"{binding}\x1e{otp}".encode(), hashlib.sha256).hexdigest()


def otp_matches(pepper: bytes, binding: str, otp: str, digest: str) -> bool:
    return hmac.compare_digest(otp_digest(pepper, binding, otp), digest)
