"""The signature of an operator's resolution (``bizcenter sagas resolve``).

``business.saga-inputs`` is a topic of a shared bus: whoever can produce to it could
otherwise make a saga credit or refund from clearing. A resolution therefore carries an
HMAC-SHA256 under the operator secret (``BIZ_OPERATOR_SECRET``) over every field that
decides what it does, and the worker checks it, in constant time, before the saga sees it.

Pure: the secret is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import json

#: Domain separation: a signature made for anything else never passes as a resolution's.
CONTEXT = "bizcenter/operatorResolution/v1"


def resolution_message(*, transfer_id: str, resolution_id: str, number: int, action: str,
                       operator: str, reason: str) -> bytes:
    """The signed bytes: the fields as a JSON array (unambiguous: no field can move into
    its neighbour, whatever characters it holds)."""
    return json.dumps([CONTEXT, transfer_id, resolution_id, number, action, operator, reason],
                      ensure_ascii=True, separators=(",", ":")).encode("ascii")


def sign_resolution(secret: bytes, *, transfer_id: str, resolution_id: str, number: int,
                    action: str, operator: str, reason: str) -> str:
    """HMAC-SHA256 of the resolution, hex."""
    return hmac.new(secret, resolution_message(
        transfer_id=transfer_id, resolution_id=resolution_id, number=number, action=action,
        operator=operator, reason=reason), hashlib.sha256).hexdigest()


def resolution_signed(secret: bytes, signature: str, *, transfer_id: str, resolution_id: str,
                      number: int, action: str, operator: str, reason: str) -> bool:
    """Whether ``signature`` is the resolution's, compared in constant time."""
    expected = sign_resolution(secret, transfer_id=transfer_id, resolution_id=resolution_id,
                               number=number, action=action, operator=operator, reason=reason)
    return hmac.compare_digest(expected.encode("ascii"),
                               signature.encode("utf-8", errors="replace"))
