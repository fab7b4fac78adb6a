"""Prometheus metrics of the worker and the account center (prometheus-client).

Served at ``/metrics`` by the worker's web server (agents/health.py) and by
the account center's small web server (reference/account_center/service.py). Each process has
its own registry (the library's default one); docs/operations.md says what each metric
means and what to do when it alarms.

Counted where the data is produced, never by parsing a record again:

``bizcenter_requests_total{type,status,code}``
    replies the worker decided, by command type, status and code (code ``""`` for ok);
``bizcenter_transfers_total{kind,outcome}``
    sagas reaching their first final state (``COMPLETED``, ``FAILED``, ``MANUAL_REVIEW``),
    transfers and top-ups;
``bizcenter_saga_duration_seconds{kind,outcome}``
    from the accepted confirm (or top-up) to that final state;
``bizcenter_saga_transitions_total{kind,state}``
    every state change, by the state entered;
``bizcenter_resolutions_total{action,outcome}``
    operator resolutions of MANUAL_REVIEW sagas, by what they ended in;
``bizcenter_open_sagas{state}``
    the sagas of this worker's partitions in each non-final state, and in MANUAL_REVIEW
    (computed when scraped, from the table);
``bizcenter_dlq_records_total{topic,reason}``
    dead letters written, by the topic of the original record and a reason category;
``bizcenter_consumer_lag{topic,partition}``
    records of each assigned input partition not yet committed (worker) or fetched
    (account center), computed when scraped;
``bizcenter_reconciliation_drift_minor{currency}``
    the live reconciliation's money-conservation difference per currency (0 balanced);
``bizcenter_reconciliation_check_ok{check}``, ``bizcenter_clearing_minor{currency}``,
``bizcenter_reconciliation_runs_total{result}``
    the other checks (1 holds, 0 fails), money in clearing, runs by result;
``bizcenter_store_batches_total{call}``, ``bizcenter_store_batched_calls_total{call}``
    the business store's batches (confirms, inits' reads, saved outcomes) and the calls
    they answered: their ratio is the mean batch size.

This module imports only the standard library and prometheus-client: every layer may call
it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REQUESTS = Counter("bizcenter_requests", "Replies decided by the worker, by command type, "
                   "status and code", ["type", "status", "code"])
TRANSFERS = Counter("bizcenter_transfers", "Sagas reaching their first final state",
                    ["kind", "outcome"])
SAGA_DURATION = Histogram(
    "bizcenter_saga_duration_seconds", "From the accepted confirm to the final state",
    ["kind", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0))
TRANSITIONS = Counter("bizcenter_saga_transitions", "Saga state changes, by the state "
                      "entered", ["kind", "state"])
RESOLUTIONS = Counter("bizcenter_resolutions", "Operator resolutions of MANUAL_REVIEW "
                      "sagas, by action and what they ended in", ["action", "outcome"])
DEAD_LETTERS = Counter("bizcenter_dlq_records", "Dead letters written, by the original's "
                       "topic and a reason category", ["topic", "reason"])
DRIFT = Gauge("bizcenter_reconciliation_drift_minor", "Live reconciliation: user balances "
              "minus (money entered - clearing), per currency; 0 when balanced",
              ["currency"])
CHECK_OK = Gauge("bizcenter_reconciliation_check_ok", "Live reconciliation: 1 when the "
                 "check holds, 0 when it fails", ["check"])
CLEARING = Gauge("bizcenter_clearing_minor", "Money held in clearing:<CUR> (transfers in "
                 "flight, or MANUAL_REVIEW)", ["currency"])
RECONCILIATIONS = Counter("bizcenter_reconciliation_runs", "Live reconciliation runs by "
                          "result (balanced, drift, error)", ["result"])
STORE_BATCHES = Counter("bizcenter_store_batches", "Batches of the business store's calls "
                        "that waited together (app/adapters/coalesce.py), by call", ["call"])
STORE_BATCHED_CALLS = Counter("bizcenter_store_batched_calls", "Calls answered by those "
                              "batches, by call", ["call"])

class LabelledChildren:
    """``metric.labels(*values)``, remembered per label set.

    prometheus-client's ``labels()`` checks and stringifies the values and takes a lock on
    every call (~2 µs): more than the ``inc()`` it precedes. Its answer for a label set
    is the same child object for the metric's life (nothing here ever calls ``remove()``
    or ``clear()`` on these metrics; tests/unit/test_metrics.py checks the identity), so
    it is looked up once. At most ``limit`` label sets are remembered (the labels here are
    bounded; beyond, ``labels()`` is simply called)."""

    __slots__ = ("_children", "_limit", "_metric")

    def __init__(self, metric: Any, limit: int = 1024) -> None:
        self._metric = metric
        self._limit = limit
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._metric.labels(*values)
            if len(self._children) < self._limit:
                self._children[values] = child
        return child


#: The children of the metrics counted per record (the hot path).
requests_of = LabelledChildren(REQUESTS)
transfers_of = LabelledChildren(TRANSFERS)
saga_duration_of = LabelledChildren(SAGA_DURATION)
transitions_of = LabelledChildren(TRANSITIONS)
resolutions_of = LabelledChildren(RESOLUTIONS)
store_batches_of = LabelledChildren(STORE_BATCHES)
store_batched_calls_of = LabelledChildren(STORE_BATCHED_CALLS)
dead_letters_of = LabelledChildren(DEAD_LETTERS)

#: Dead-letter reasons by their first words: a bounded label (the reason itself holds ids).
_REASON_CATEGORIES = (
    ("too large", "too_large"), ("undecodable", "undecodable"), ("too deep", "too_deep"),
    ("invalid", "invalid"), ("internal error", "internal_error"),
    ("foreign id", "foreign_id"), ("not a charge of this service", "foreign_id"),
    ("capture ", "unknown_topup_capture"), ("output to ", "output_unsendable"),
    ("an output was refused", "output_refused"), ("its event was refused", "output_refused"),
    ("ledger refused", "ledger_refused"),
)


def reason_category(reason: str) -> str:
    """A bounded label for a dead letter's reason (its first words), ``other`` if unknown."""
    low = reason.lower()
    for prefix, category in _REASON_CATEGORIES:
        if low.startswith(prefix):
            return category
    return "other"


def store_batch(call: str, size: int) -> None:
    """A batch of ``size`` calls of the store's ``call`` ran."""
    store_batches_of(call).inc()
    store_batched_calls_of(call).inc(size)


def dead_lettered(topic: str, reason: str) -> None:
    dead_letters_of(topic, reason_category(reason)).inc()


#: Command types a reply may name; any other (a refused record's own ``type``) is ``other``,
#: so that a sender cannot make labels up.
COMMAND_TYPES = frozenset({"transferInit", "transferConfirm", "verifyOtp", "topUp",
                           "queryBalance", "queryTransactionDetails",
                           "queryTransactionHistory"})


def replied(command_type: str, status: str, code: str | None) -> None:
    requests_of(command_type if command_type in COMMAND_TYPES else "other", status,
                code or "").inc()


# --------------------------------------------------------------------------------------
# computed when scraped
# --------------------------------------------------------------------------------------


class CallbackCollector(Collector):
    """A gauge family computed by ``compute`` when scraped, at most every ``ttl`` seconds
    (the last result is served in between); a failure serves nothing and is logged."""

    def __init__(self, name: str, documentation: str, labels: list[str],
                 compute: Callable[[], Iterable[tuple[tuple[str, ...], float]]], *,
                 ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.compute = compute
        self.ttl = ttl
        self.clock = clock
        self._cached: tuple[float, list[tuple[tuple[str, ...], float]]] | None = None

    def describe(self) -> Iterable[Any]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        now = self.clock()
        if self._cached is None or now - self._cached[0] >= self.ttl:
            try:
                self._cached = (now, list(self.compute()))
            except Exception as exc:
                log.warning("metric %s not computed: %s", self.name, type(exc).__name__)
                self._cached = (now, [])
        for labels, value in self._cached[1]:
            family.add_metric(list(labels), value)
        yield family


def register_collector(collector: Collector) -> Collector:
    """Register ``collector`` in the default registry, replacing one of the same name (a
    test may build several apps in one process)."""
    name = getattr(collector, "name", None)
    for existing in list(getattr(REGISTRY, "_collector_to_names", {})):
        if name is not None and getattr(existing, "name", None) == name:
            REGISTRY.unregister(existing)
    REGISTRY.register(collector)
    return collector


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric of this process, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


#: The ``state`` value of a saga as stored (orjson of ``saga_to_dict``): the first
#: ``"state":"`` in the bytes is the saga's own (the nested transfer has no such key, and a
#: quote inside a string value is escaped, so no value can hold it).
_STATE = b'"state":"'
_HOME = b'"home_partition":'


def saga_state_and_home(raw: bytes) -> tuple[str, int] | None:
    """(state, home partition) of a stored saga without parsing all of it."""
    i = raw.find(_STATE)
    j = raw.find(_HOME)
    if i < 0 or j < 0:
        return None
    i += len(_STATE)
    end = raw.find(b'"', i)
    j += len(_HOME)
    k = j
    while k < len(raw) and raw[k:k + 1].isdigit():
        k += 1
    if end < 0 or k == j:
        return None
    return raw[i:end].decode(), int(raw[j:k])
