"""What a saga's state change tells operators: one log line and the saga metrics.

Called by the service once a saga's new state is written (``TransferService._apply``), with
the outputs of that step: every state change is a :class:`PublishTransferEvent` among them,
so nothing is parsed again. Logged with the request's ids as ``extra``
(``transferId``, ``requestId``, ``operatorId``: app/log_format.py); ``MANUAL_REVIEW`` at
WARNING (operators must act); a saga's end (``COMPLETED``, ``FAILED``), money going back
(``REFUNDING``, ``REVERSING``) and every step of an operator's resolution at INFO; the
routine steps (``AWAITING_OTP``, ``DEBITING``, ``CREDITING``, ``CHARGING``) at DEBUG. Every
step is on ``business.transfer-events`` and in ``bizcenter sagas show``; a line per step at
INFO cost the worker ~4 % of its CPU (three to four lines per transfer; docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from app import metrics
from app.domain import transfer_saga as saga_core

log = logging.getLogger("app.saga")

_MANUAL_REVIEW = saga_core.State.MANUAL_REVIEW.value
_REVERSING = saga_core.State.REVERSING.value
_WITH_CODE = frozenset({saga_core.State.FAILED.value, _MANUAL_REVIEW})
_FINAL = frozenset(s.value for s in saga_core.FINAL_STATES)
#: The states whose entry is logged at INFO (MANUAL_REVIEW at WARNING; the others at DEBUG).
_AT_INFO = _FINAL | {saga_core.State.REFUNDING.value, _REVERSING}


def observe(saga: saga_core.Saga, outputs: Iterable[saga_core.Output]) -> None:
    """Log and count every state change among ``outputs`` (the step that made ``saga``)."""
    for out in outputs:
        if isinstance(out, saga_core.PublishTransferEvent):
            _state_changed(saga, out)


def _state_changed(saga: saga_core.Saga, event: saga_core.PublishTransferEvent) -> None:
    t = saga.transfer
    state = event.state
    if state == _MANUAL_REVIEW:
        level = logging.WARNING
    elif state in _AT_INFO or saga.resolution_count:
        level = logging.INFO
    else:
        level = logging.DEBUG
    if log.isEnabledFor(level):  # the line is built only when some handler may want it
        resolution = (f" (operator resolution {saga.resolution_count}: "
                      f"{saga.resolution_action} by {saga.resolved_by})"
                      if saga.resolution_count else "")
        log.log(level, "%s %s: %s -> %s%s%s", t.kind, t.transfer_id,
                event.previous_state or "start", state,
                f" ({event.code})" if event.code and state in _WITH_CODE else "",
                resolution, extra={"transferId": t.transfer_id, "requestId": saga.reply_to,
                                   "operatorId": t.operator_id})
    metrics.transitions_of(t.kind, state).inc()
    if state not in _FINAL:
        return
    if saga.resolution_count:  # an operator's resolution ended: the transfer was counted
        metrics.resolutions_of(saga.resolution_action or "unknown", state).inc()
        return
    if event.previous_state == _REVERSING:
        return  # a late capture given back: the top-up was counted when it failed
    metrics.transfers_of(t.kind, state).inc()
    metrics.saga_duration_of(t.kind, state).observe(max(0.0, event.at - saga.created_at))
