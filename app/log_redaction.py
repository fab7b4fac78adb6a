"""No secret in any log line, at any level: a filter on every handler of every process.

Faust at DEBUG logs every value it sends (OTP notifications, commands holding a PIN and
tokens), libraries log requests, exceptions quote their inputs. Rather than trust each
call site, every record is redacted on its way to any handler:

* the values of known secret fields, in JSON (``"pin": "123456"``, also escaped inside
  another JSON string), Python reprs (``'otp': '123456'``) and ``key=value`` forms:
  ``accessToken``, ``access_token``, ``transferToken``, ``transfer_token``, ``pin``,
  ``otp``, ``authorization``, ``password``;
* ``Bearer <credentials>``;
* anything shaped like a JWT (three base64url segments, the first starting ``eyJ``, i.e.
  ``{"``), wherever it appears.

:func:`install` puts :class:`RedactSecrets` on every handler that exists when it is
called (the root logger's and every named logger's); call it again after anything that
replaces handlers (Faust's worker does, see agents/worker.py).
"""

from __future__ import annotations

import logging
import re
from typing import Final

#: What replaces a secret.
REDACTED: Final = "<redacted>"

SECRET_FIELDS: Final = (
    "accessToken", "access_token", "transferToken", "transfer_token", "pin", "otp",
    "authorization", "password",
)

_FIELD = re.compile(
    r"""(?P<name>(?<![A-Za-z0-9_])(?:\\*["'])?(?:""" + "|".join(SECRET_FIELDS) + r""")"""
    r"""(?:\\*["'])?)"""
    r"""(?P<sep>\s*[:=]\s*)"""
    r"""(?P<value>\\*"(?:[^"\\]|\\[^"])*\\*"|'[^']*'|(?:Bearer\s+)?[^\s"',;&)}\]]+)""",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]+")
#: A JWS in compact form: base64url header (a JSON object: ``{"`` is ``eyJ``), payload,
#: signature. Also an unsigned or truncated one (empty signature).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _field(match: re.Match[str]) -> str:
    value = match.group("value")
    unescaped = value.lstrip("\\")
    quote = ""
    if unescaped[:1] in ('"', "'"):
        quote = value[: len(value) - len(unescaped)] + unescaped[0]
    return f"{match.group('name')}{match.group('sep')}{quote}{REDACTED}{quote}"


#: Lower-case forms of what ``_FIELD`` needs (one of the names) and ``_BEARER`` needs.
_NAMES_LOWER: Final = tuple(dict.fromkeys(name.lower() for name in SECRET_FIELDS))


def redact(text: str) -> str:
    """``text`` with every secret field value, bearer credential and JWT replaced.
    Idempotent: redacting twice gives the same text.

    Each pattern runs only where it could match: for ASCII text (in which case-insensitive
    matching involves ASCII letters only), ``_FIELD`` needs ``:`` or ``=`` and one of the
    names in the lower-cased text, ``_BEARER`` needs ``bearer`` in it, ``_JWT`` needs
    ``eyJ``; a text lacking one is returned by that step unchanged, which is what the
    pattern would have returned. Non-ASCII text (where Unicode case folding could make
    other characters match) always goes through every pattern."""
    if not text:
        return text
    if text.isascii():
        low = text.lower()
        if ("=" in text or ":" in text) and any(name in low for name in _NAMES_LOWER):
            text = _FIELD.sub(_field, text)
        if "bearer" in low:
            text = _BEARER.sub(f"Bearer {REDACTED}", text)
        if "eyJ" in text:
            text = _JWT.sub(REDACTED, text)
        return text
    return _redact_fully(text)


def _redact_fully(text: str) -> str:
    """Every pattern over ``text`` (non-ASCII text; and the reference of the tests)."""
    text = _FIELD.sub(_field, text)
    text = _BEARER.sub(f"Bearer {REDACTED}", text)
    return _JWT.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """Rewrites each record's message (with its arguments merged in), exception text and
    stack text with :func:`redact`. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it, redacted
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = ()  # not None: some formatters (mode's) turn None into (None,)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER: Final = RedactSecrets()


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.root.handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    return handlers


def install() -> int:
    """Put the redaction filter on every handler that exists now (idempotent); returns
    how many handlers carry it."""
    handlers = _all_handlers()
    for handler in handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(_FILTER)
    return len(handlers)
