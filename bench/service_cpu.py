"""CPU of the application layer alone, per transfer: ``python -m bench.service_cpu``.

N complete transfers (transferInit → transferConfirm → verifyOtp when the amount is above
the OTP threshold, then the account center's debit and credit and the saga inputs they
cause) through the real :class:`app.transfers.service.TransferService` on the in-memory
fakes of ``tests/fakes.py`` (its :class:`Harness`, with the account center simulator).
No Faust, no Kafka, no PostgreSQL: what is left is the business CPU a batch design keeps.

The mix is the end-to-end benchmark's (bench/config.py): amounts uniform in
``[MIN, threshold]``, and with probability ``--otp-share`` (10 %) in
``(threshold, 2 * threshold]``; payer and payee drawn from ``--users`` users; each user
keeps one access token, as the gateway of ``bench.virtual_users`` does. Logging is set up
as the worker's (JSON lines at INFO, the redaction filter, to ``/dev/null``), the metrics
are the process's real prometheus ones.

What is measured (``time.process_time``, one process, one thread, deterministic input):

* **service**: CPU inside the service's entry points (``handle_command``,
  ``handle_saga_input``, ``route_account_event``), per transfer; it includes the fakes
  of the ports it calls;
* **store (fake)**: the part of it spent in the in-memory ``BusinessStore`` (made cheap
  here: no deep-copied snapshot per ``confirm_checks``, rows of finished transfers
  dropped, so nothing grows with N), reported apart and subtracted: **application**;
* **account center (sim)** and **driver** (building the gateway's commands, reading the
  replies): outside the service, reported apart.

``--profile`` runs the same load under cProfile and prints where the application's time
goes, by area (own time of each function, grouped by module; cProfile's per-call overhead
inflates small functions, so read shares, not absolute figures).

Old code against new in one sitting: ``PYTHONPATH=/tmp/wt-svc python -m bench.service_cpu``
runs this file against a worktree of an older commit (the file itself is copied there or
run from here with ``--root``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import logging
import pstats
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Amounts (bench/config.py's, not imported so that this file runs against older trees).
OTP_THRESHOLD_MINOR = 100_000
MIN_AMOUNT_MINOR = 100


def _setup_logging() -> None:
    from app import log_format, log_redaction

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(open("/dev/null", "w"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log_redaction.install()
    log_format.install("json")


class _Clock:
    """Accumulates CPU seconds of wrapped calls by area (re-entrant calls counted once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap_async(self, area: str, fn: Callable[..., Awaitable[Any]]
                   ) -> Callable[..., Awaitable[Any]]:
        clock = time.process_time
        seconds, depth = self.seconds, self._depth
        seconds.setdefault(area, 0.0)
        depth.setdefault(area, 0)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            if depth[area]:
                return await fn(*args, **kwargs)
            depth[area] += 1
            start = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                seconds[area] += clock() - start
                depth[area] -= 1
        return timed

    def wrap(self, area: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.process_time
        seconds = self.seconds
        seconds.setdefault(area, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[area] += clock() - start
        return timed


def _build(users: int, seed: int) -> Any:
    """A Harness whose store, replies and bookkeeping do not grow with N."""
    from tests.fakes import DictSagas, Harness, InMemoryBusinessStore, SeedUser

    class CheapStore(InMemoryBusinessStore):
        """The fake store without its per-transaction deep copy (no step of this load
        raises inside ``confirm_checks``), and with a way to drop finished transfers."""

        def _state(self) -> dict[str, Any]:
            return {}

        def _restore(self, saved: dict[str, Any]) -> None:
            raise AssertionError("confirm_checks raised under the benchmark's load")

        def forget(self) -> None:
            """Drop the rows of finished transfers (the load never refers to them again)."""
            for rows in (self.token_uses, self.reservations, self.otp_sends, self.kept,
                         self.pin_failure_records, self.otp_failures):
                rows.clear()
            self.calls.clear()

    class LoadHarness(Harness):
        """Keeps only the last reply per request and the last OTP per transfer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.last_reply: dict[str, bytes] = {}
            self.last_otp: dict[str, bytes] = {}
            self.store = CheapStore(self.store.users[u].record for u in self.users)
            # The tests' check of every stored saga against dataclasses.asdict is not the
            # application's cost (it was ~40 % of this figure until session 23).
            self.sagas = DictSagas(check_storage_form=False)
            self.service = self._service(self.store)
            self.tokens: dict[str, str] = {}

        def emit(self, outs: Any) -> None:
            t = self.topics
            for out in outs:
                if out.topic in self._pumped:
                    self.outbox.append(out)
                elif out.topic == t.replies:
                    self.last_reply[out.key.decode()] = out.value
                elif out.topic == t.otp:
                    self.last_otp[out.key.decode()] = out.value

        def access_token(self, user_id: str, *, ttl_seconds: int = 900) -> str:
            token = self.tokens.get(user_id)
            if token is None:  # one per user, as the benchmark's gateway keeps it
                token = self.tokens[user_id] = super().access_token(user_id,
                                                                    ttl_seconds=ttl_seconds)
            return token

    seeded = [SeedUser(f"user-{i:04d}", f"acc-{i:04d}", 10**15, pin=f"{731000 + i:06d}",
                       otp_threshold_minor=OTP_THRESHOLD_MINOR, daily_limit_minor=10**15,
                       phone=f"+1555{i:07d}")
              for i in range(users)]
    return LoadHarness(seeded, otp_seed=seed)


async def _transfer(h: Any, rng: random.Random, otp_share: float, n: int,
                    user_ids: list[str], accounts: list[str]) -> None:
    import orjson

    payer_i = rng.randrange(len(user_ids))
    payee_i = (payer_i + 1 + rng.randrange(len(user_ids) - 1)) % len(user_ids)
    payer = user_ids[payer_i]
    if rng.random() < otp_share:
        amount = rng.randint(OTP_THRESHOLD_MINOR + 1, 2 * OTP_THRESHOLD_MINOR)
    else:
        amount = rng.randint(MIN_AMOUNT_MINOR, OTP_THRESHOLD_MINOR)
    rid = f"init-{n}"
    await h.send(h.command("transferInit", payer, {"toAccountId": accounts[payee_i],
                                                   "amountMinor": amount,
                                                   "currency": "EUR"}, request_id=rid))
    reply = orjson.loads(h.last_reply.pop(rid))
    assert reply["status"] == "ok", reply
    token = reply["data"]["transferToken"]
    idem = f"idem-{n}"
    rid = f"confirm-{n}"
    await h.send(h.command("transferConfirm", payer,
                           {"transferToken": token, "pin": h.users[payer].pin},
                           idem=idem, request_id=rid))
    await h.run_until_quiet()
    reply = orjson.loads(h.last_reply.pop(rid))
    if reply["status"] == "pending" and reply.get("code") == "OTP_REQUIRED":
        transfer_id = reply["data"]["transferId"]
        otp = orjson.loads(h.last_otp.pop(payer))
        assert otp["transferId"] == transfer_id
        rid = f"otp-{n}"
        await h.send(h.command("verifyOtp", payer, {"otp": otp["otp"]}, idem=idem,
                               request_id=rid))
        await h.run_until_quiet()
        reply = orjson.loads(h.last_reply.pop(rid))
    assert reply["status"] == "ok" and reply["data"]["state"] == "COMPLETED", reply


async def run(transfers: int, warmup: int, users: int, otp_share: float, seed: int,
              profile: cProfile.Profile | None = None) -> dict[str, float]:
    h = _build(users, seed)
    clock = _Clock()
    svc = h.service
    for name in ("handle_command", "handle_saga_input"):
        setattr(svc, name, clock.wrap_async("service", getattr(svc, name)))
    svc.route_account_event = clock.wrap("service", svc.route_account_event)
    store = h.store
    for name in ("get_user", "get_funding_source", "init_facts", "confirm_checks",
                 "release_daily_limit", "kept_outcome", "save_outcome", "otp_failures_since",
                 "record_otp_failure"):
        setattr(store, name, clock.wrap_async("store", getattr(store, name)))
    h.sim.apply = clock.wrap("account center", h.sim.apply)
    user_ids = list(h.users)
    accounts = [h.users[u].account_id for u in user_ids]
    rng = random.Random(seed)
    for n in range(warmup):
        await _transfer(h, rng, otp_share, n, user_ids, accounts)
        h.store.forget()
    for area in clock.seconds:
        clock.seconds[area] = 0.0
    gc.collect()
    start = time.process_time()
    if profile is not None:
        profile.enable()
    for n in range(warmup, warmup + transfers):
        await _transfer(h, rng, otp_share, n, user_ids, accounts)
        if n % 64 == 0:
            h.store.forget()
    if profile is not None:
        profile.disable()
    total = time.process_time() - start
    per = 1e6 / transfers
    service = clock.seconds["service"]
    store_s = clock.seconds["store"]
    sim = clock.seconds["account center"]
    return {
        "total": total * per,
        "service": service * per,
        "store": store_s * per,
        "application": (service - store_s) * per,
        "account_center": sim * per,
        "driver": (total - service - sim) * per,
    }


#: Areas of the profile: the first prefix of a function's file that matches names it.
_AREAS = (
    ("app/tokens.py", "tokens (app)"), ("/jwt/", "tokens (PyJWT)"),
    ("cryptography", "tokens (PyJWT)"), ("hmac.py", "hmac/hashlib"),
    ("app/saga_telemetry.py", "logging"), ("app/log_format.py", "logging"),
    ("app/log_redaction.py", "logging"), ("logging/", "logging"), ("json/", "logging"),
    ("posixpath", "logging"),
    ("app/metrics.py", "metrics"), ("prometheus_client", "metrics"),
    ("app/domain/", "saga core (domain)"), ("app/transfers/outbound.py", "outbound"),
    ("app/replies.py", "outbound"), ("app/transfers/", "transfer service"),
    ("app/record_failures.py", "record guard"), ("schemas/", "pydantic"),
    ("pydantic", "pydantic"), ("tests/fakes.py", "fakes (store, tables, sim)"),
    ("bench/", "driver"), ("uuid.py", "uuid"), ("asyncio", "asyncio"),
)


def _area(filename: str, name: str) -> str:
    if filename == "~":
        if "orjson" in name:
            return "orjson"
        if "hmac" in name or "openssl" in name or "_hashlib" in name:
            return "hmac/hashlib"
        if "pydantic" in name or "validate" in name or "serializ" in name:
            return "pydantic"
        if "process_time" in name:
            return "driver"
        return "builtins: " + name.split(" of ")[0].strip("<>{}").replace("method ", "")
    if "json/" in filename and name in ("loads", "detect_encoding", "decode", "raw_decode",
                                          "__init__"):
        return "tokens (PyJWT)"  # json.loads: PyJWT's header/payload and HMAC key checks
    for prefix, area in _AREAS:
        if prefix in filename:
            return area
    return "other: " + "/".join(filename.rsplit("/", 2)[-2:])


def _breakdown(profile: cProfile.Profile, transfers: int, application_us: float) -> str:
    stats = pstats.Stats(profile, stream=io.StringIO())
    areas: dict[str, float] = {}
    raw: Any = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, tottime, _cum, _callers) in raw.items():
        area = _area(filename, name)
        areas[area] = areas.get(area, 0.0) + tottime
    skip = {"driver", "fakes (store, tables, sim)", "asyncio"}
    kept = {a: s for a, s in areas.items() if a not in skip}
    total = sum(kept.values())
    lines = [f"profile (own time by area; shares of the application's CPU, scaled to "
             f"{application_us:.0f} µs/transfer; excluded: {', '.join(sorted(skip))} = "
             f"{sum(areas.get(a, 0.0) for a in skip) / total * 100:.0f} % more):"]
    for area, seconds in sorted(kept.items(), key=lambda kv: -kv[1])[:24]:
        share = seconds / total
        lines.append(f"  {area:<34} {share * 100:5.1f} %  ~{share * application_us:6.0f} µs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--otp-share", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--profile", action="store_true", help="one more run under cProfile")
    parser.add_argument("--top", type=int, default=0, help="with --profile: the top "
                        "functions by own time too")
    args = parser.parse_args(argv)
    _setup_logging()
    results = []
    for _ in range(args.repeat):
        results.append(asyncio.run(run(args.transfers, args.warmup, args.users,
                                       args.otp_share, args.seed)))
    keys = list(results[0])
    print(f"{args.transfers} transfers ({args.otp_share:.0%} with an OTP), {args.users} users, "
          f"{args.repeat} runs; CPU µs per transfer (process_time), median and minimum (the "
          f"minimum is the figure least disturbed by other processes on the cores):")
    for key in keys:
        values = [r[key] for r in results]
        print(f"  {key:<16} {statistics.median(values):8.1f}  min {min(values):8.1f}   "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    if args.profile:
        profile = cProfile.Profile()
        asyncio.run(run(args.transfers, args.warmup, args.users, args.otp_share, args.seed,
                        profile))
        application = statistics.median(r["application"] for r in results)
        print(_breakdown(profile, args.transfers, application))
        if args.top:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
