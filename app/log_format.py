"""How log lines look: text for a terminal (the default) or JSON lines (``BIZ_LOG_FORMAT=json``),
and rebalance cancellations told as what they are.

**JSON lines.** One object per line::

    {"ts": "2026-11-30T09:14:36.123Z", "level": "INFO", "logger": "app.saga",
     "message": "...", "requestId": "...", "transferId": "...", "operatorId": "..."}

``requestId``, ``transferId`` and ``operatorId`` appear when the record carries them, i.e.
when the call site passes them as ``extra``::

    log.info("saga %s -> %s", old, new, extra={"transferId": tid, "requestId": rid})

(the convention for every line about a request or a transfer: these three names, exactly,
in ``extra``; see docs/operations.md). ``exc`` holds the traceback when there is one. The
redaction filter (app/log_redaction.py) runs on each handler before the formatter, so the
message and the traceback are already redacted; the id fields are redacted too.

**Text lines.** On a terminal, Faust's colored lines stay. Anywhere else (a file, a pipe,
a log collector) :data:`TEXT_FORMAT`, plain: mode's colored formatter cost ~100 µs of CPU
per line against ~20 µs (measured; one line per saga state change is ~4 lines per
transfer, ~10 % of the worker's CPU in the benchmark, docs/performance.md).

**Rebalance cancellations.** When a rebalance revokes partitions, Faust cancels the agent
tasks that were working on them and mode logs each as ``Crashed reason=CancelledError()``
at ERROR with a traceback. Nothing crashed: the records are delivered again to the new
owner. :class:`RebalanceCancellations` turns exactly those records (a ``faust``/``mode``
logger, the message ``Crashed reason=CancelledError()``, or its exception a
``CancelledError``) into one INFO line without a traceback. Any other crash stays an ERROR.
Likewise :class:`RetriedCoordinatorLookups`: aiokafka's ERROR for a group-coordinator lookup
that failed with a retriable error (and is retried) becomes a WARNING.

:func:`install` applies both to every handler that exists; call it again after anything
that replaces handlers (Faust's worker does, see agents/worker.py), like ``log_redaction.install``.

**Lean records.** :func:`install` also stops ``logging`` from looking up, for every record,
the thread's and multiprocessing's names (the logging HOWTO's "Optimization":
``logThreads``, ``logMultiprocessing``): no format of this service shows them, and they
were a sixth of a line's cost. A format given by hand that asks for ``%(threadName)s`` or
``%(processName)s`` shows None instead. The caller's file, line and function are still
looked up (``logging._srcfile`` kept): without them ``stack_info=True`` would print no
stack, for 1.6 µs a line. ``%(process)d`` stays (mode's terminal format shows it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Final, Literal

from app.log_redaction import redact

#: The ``extra`` names a JSON line carries as fields when a record has them.
ID_FIELDS: Final = ("requestId", "transferId", "operatorId")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


#: ``json.dumps(line, ensure_ascii=False, default=str)``, its encoder built once.
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        #: The second last formatted (``int(record.created)``) and its text.
        self._second: tuple[int, str] = (-1, "")

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:  # gmtime + strftime once per second, not per line
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                  time.gmtime(record.created)))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = redact(str(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(self.formatException(record.exc_info))
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return _ENCODE(line)


def _is_cancellation(record: logging.LogRecord) -> bool:
    if not record.name.startswith(("faust", "mode")) or record.levelno < logging.ERROR:
        return False
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        message = record.getMessage()
    except Exception:
        return False
    return "Crashed reason=CancelledError(" in message


class RebalanceCancellations(logging.Filter):
    """A ``Crashed reason=CancelledError()`` record of Faust or mode becomes one INFO line
    without a traceback. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_cancellation(record):
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
            record.msg = record.getMessage() + " (a rebalance cancelled the task; its " \
                "records are delivered again)"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


class RetriedCoordinatorLookups(logging.Filter):
    """aiokafka logs a failed group-coordinator lookup at ERROR and then retries it when
    the error is retriable (``CoordinatorNotAvailableError`` while a fresh broker creates
    ``__consumer_offsets``, or while the coordinator moves). Such a record becomes a
    WARNING; a non-retriable one stays an ERROR. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= logging.ERROR and record.name.startswith("aiokafka")
                and record.msg == "Group Coordinator Request failed: %s"
                and isinstance(record.args, tuple) and record.args
                and getattr(record.args[0], "retriable", False) is True):
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
            record.msg = "Group Coordinator Request failed (retriable, retrying): %s"
        return True


_CANCELLATIONS: Final = RebalanceCancellations()
_COORDINATOR_LOOKUPS: Final = RetriedCoordinatorLookups()


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.root.handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.extend(logger.handlers)
    return handlers


def install(log_format: Literal["text", "json"] = "text") -> int:
    """On every handler that exists now: the cancellation and coordinator-lookup filters
    (ahead of the others, so that they see the record's own arguments and no traceback is
    formatted for a cancellation) and, with ``json``, the JSON formatter.
    Idempotent; returns how many handlers it saw. Records are made lean (see the module's
    docstring)."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    handlers = _all_handlers()
    for handler in handlers:
        if not any(isinstance(f, RebalanceCancellations) for f in handler.filters):
            handler.filters.insert(0, _CANCELLATIONS)
        if not any(isinstance(f, RetriedCoordinatorLookups) for f in handler.filters):
            handler.filters.insert(0, _COORDINATOR_LOOKUPS)
        if log_format == "json" and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
        elif log_format == "text" and _colored(handler) and not _on_terminal(handler):
            handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return len(handlers)


def _colored(handler: logging.Handler) -> bool:
    """A formatter of mode's (colorlog's), which Faust's worker installs."""
    return type(handler.formatter).__module__.startswith(("mode.", "colorlog"))


def _on_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream
        return False
