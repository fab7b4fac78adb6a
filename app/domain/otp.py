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


def seal_otp(pepper: bytes, binding: str, otp: str, digest: str) -> str:
    """The OTP encrypted for the saga's state, so that a crash between writing the state
    and sending the notification can be recovered by sending the same OTP again: a one-time
    pad from HMAC-SHA256 under the pepper, bound to the transfer and to this OTP's digest
    (a new OTP gets a new pad). Without the pepper the sealed value reveals nothing."""
    data = otp.encode()
    pad = _seal_pad(pepper, binding, digest)
    if len(data) > len(pad):
        raise ValueError("OTP too long to seal")
    return bytes(a ^ b for a, b in zip(data, pad, strict=False)).hex()


def unseal_otp(pepper: bytes, binding: str, sealed: str, digest: str) -> str | None:
    """The OTP sealed by :func:`seal_otp`, or None when it does not match ``digest``."""
    try:
        data = bytes.fromhex(sealed)
    except ValueError:
        return None
    pad = _seal_pad(pepper, binding, digest)
    try:
        otp = bytes(a ^ b for a, b in zip(data, pad, strict=False)).decode()
    except UnicodeDecodeError:
        return None
    return otp if otp_matches(pepper, binding, otp, digest) else None


def _seal_pad(pepper: bytes, binding: str, digest: str) -> bytes:
    return hmac.new(pepper, f"otp-seal\x1f{binding}\x1f{digest}".encode(),
                    hashlib.sha256).digest()
