"""One benchmark run, start to finish.

1. An isolated system: topics, schemas, A seeded users and accounts; the account center and
   N workers as child processes.
2. Readiness: every partition of business.commands answers, the worker group is stable with
   N members, and one complete transfer went through.
3. Load: K virtual users for the warm-up, then the measured window (CPU of every process
   sampled over the window; optionally py-spy profiles of the worker(s) and the account
   center).
4. Drain (in-flight transfers finish), quiescence with a deadline, the money checks.
5. The system stops; the echo ceiling is measured on the same broker with the same
   concurrency and the mean message sizes of the run.
6. result.json, result.png, a line of docs/performance.md, the console summary.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text

from agents.saga_engine import saga_group
from bench import hops, machine, profiling, report, traced_worker
from bench.config import BenchConfig
from bench.echo import EchoClient, EchoResult, server_command
from bench.gateway import BenchGateway
from bench.isolated_system import IsolatedSystem, base_settings, run_settings
from bench.money_check import Checks, check_money, wait_quiet
from bench.stats import latency_summary, per_second
from bench.virtual_users import COMPLETED, TransferSample, VirtualUsers
from reference.user_center import issue_access_token

log = logging.getLogger("bench")


class Aborted(Exception):
    """The run cannot go on (a process died, the system never became ready)."""


async def run(cfg: BenchConfig) -> int:
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_id = f"bench{stamp.replace('-', '')}{secrets.token_hex(2)}"
    run_dir = cfg.output_dir / (f"{stamp}-{cfg.label}" if cfg.label else stamp)
    run_dir.mkdir(parents=True, exist_ok=False)
    settings = run_settings(base_settings(), run_id, cfg, run_dir / "worker-data")
    system = IsolatedSystem(settings, cfg, run_dir)
    gateway = BenchGateway(settings.kafka_bootstrap_servers, settings.topic)
    log.info("run %s: %d worker(s), K=%d, A=%d, OTP %.0f%%, %d partitions, %.0f s + %.0f s "
             "warm-up → %s", run_id, cfg.workers, cfg.users, cfg.accounts,
             100 * cfg.otp_share, cfg.partitions, cfg.duration, cfg.warmup, run_dir)
    result: dict[str, Any] = {
        "runId": run_id, "startedAt": started.isoformat().replace("+00:00", "Z"),
        "outputDir": str(run_dir), "settings": cfg.as_json(), "system": system.describe(),
    }
    try:
        return await measure(cfg, system, gateway, result)
    finally:
        await system.close(drop=not cfg.keep)


async def measure(cfg: BenchConfig, system: IsolatedSystem, gateway: BenchGateway,
                  result: dict[str, Any]) -> int:
    """Seed, start, load, check, stop, echo, report; the exit status."""
    settings, run_dir = system.settings, system.run_dir
    checks = Checks()
    vus: VirtualUsers | None = None
    load: dict[str, Any] = {}
    try:
        await system.prepare()
        if not cfg.skip_echo:  # now: their leaders are settled when the echo starts
            await system.create_topics(*echo_topics(settings))
        async with system.ledger.engine.connect() as conn:  # type: ignore[union-attr]
            pg_version = (await conn.execute(text("SHOW server_version"))).scalar_one()
        result["machine"] = machine.describe(str(pg_version))
        ttl = int(cfg.warmup + cfg.duration + cfg.drain_timeout + cfg.start_timeout + 3600)
        user_ids = [f"u{i:06d}" for i in range(cfg.accounts)]
        tokens = {u: issue_access_token(settings, u, ttl_seconds=ttl) for u in user_ids}
        users = await system.seed(tokens)
        log.info("seeded %d users and accounts", len(users))
        system.start_all()
        await gateway.start()
        vus = VirtualUsers(cfg, gateway, users)
        await wait_ready(system, gateway, vus, cfg)
        load = await drive(system, gateway, vus, cfg, run_dir)
        quiet = await wait_quiet(settings, system.ledger, gateway,  # type: ignore[arg-type]
                                 cfg.quiesce_timeout)
        errors = {f"{step}:{code}": n for (step, code), n in vus.errors.items()}
        checks = await check_money(system.ledger, gateway, users,  # type: ignore[arg-type]
                                   vus.samples, quiet, system.dead(), errors)
        result["quiescence"] = quiet
        load["recordsPerTransfer"] = await records_per_transfer(settings, len(vus.samples))
        try:
            load["hops"] = await hops.measure(settings, load["windowWall"])
        except Exception:  # a measurement, not a check: report it missing, go on
            log.exception("could not read the hops from the run's topics")
    except Aborted as exc:
        log.error("run aborted: %s", exc)
        checks.add("run completed", False, str(exc))
        for name in system.processes:
            tail = system.log_tail(name)
            if tail:
                log.error("--- last lines of %s ---\n%s", name, tail)
    finally:
        await gateway.stop()
        await system.stop_all()

    echo: EchoResult | None = None
    if not cfg.skip_echo and load and gateway.requests_sent:
        request_size = gateway.bytes_sent // max(1, gateway.requests_sent)
        reply_size = gateway.bytes_received // max(1, gateway.replies_matched)
        echo = await measure_echo(system, cfg, request_size, reply_size)
        result["echoMessageBytes"] = {"request": request_size, "reply": reply_size}

    result.setdefault("machine", machine.describe(None))
    result["checks"] = checks.as_json()
    result["figures"], series = figures(cfg, vus, load, gateway, echo)
    report.write_json(run_dir / "result.json", result)
    png = report.write_png(run_dir / "result.png", result, series)
    if cfg.append_doc:
        report.append_doc_line(result)
    print(report.console_summary(result))
    print(f"  results: {run_dir / 'result.json'}" + (f", {run_dir / 'result.png'}" if png
                                                     else ""))
    if not checks.passed:
        print("\n" + "!" * 78 + "\n!!! BENCHMARK CHECKS FAILED: see the [FAIL] lines above\n"
              + "!" * 78)
        return 1
    return 0


async def watch(system: IsolatedSystem, vus: VirtualUsers, seconds: float) -> None:
    """Sleep, but stop at once when a process or a virtual user dies."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        await asyncio.sleep(min(0.5, left))
        if system.dead():
            raise Aborted(f"process(es) died under load: {', '.join(system.dead())}")
        failure = vus.failed()
        if failure is not None:
            raise Aborted(f"a virtual user failed: {failure!r}")


async def wait_ready(system: IsolatedSystem, gateway: BenchGateway, vus: VirtualUsers,
                     cfg: BenchConfig) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.start_timeout
    probe = vus.users[0], vus.users[1]

    def check_alive() -> None:
        if system.dead():
            raise Aborted(f"process(es) died at start: {', '.join(system.dead())}")
        if loop.time() > deadline:
            raise Aborted(f"the system was not ready in {cfg.start_timeout:.0f} s")

    async def every_partition_answers() -> None:
        for partition in range(cfg.partitions):
            while True:
                check_alive()
                env = gateway.envelope(
                    "transferInit", probe[0].user_id, probe[0].token,
                    {"toAccountId": probe[1].account_id, "amountMinor": 100,
                     "currency": "USD"})
                try:
                    await gateway.request(env, 5.0, partition=partition)
                    break
                except TimeoutError:
                    continue

    await every_partition_answers()
    while True:
        state, members = await system.group_state(system.settings.app_id)
        engine_state, engine_members = await system.group_state(saga_group(system.settings))
        if ((state, engine_state) == ("Stable", "Stable")
                and members == engine_members == cfg.workers):
            break
        check_alive()
        await asyncio.sleep(0.5)
    await every_partition_answers()  # again: a late rebalance moved partitions
    first = asyncio.create_task(vus.transfer(-1, random.Random(cfg.seed)))
    while not first.done():
        await asyncio.wait([first], timeout=0.5)
        if not first.done() and system.dead():
            first.cancel()
        check_alive()
    sample = first.result()
    if sample.outcome != COMPLETED:
        raise Aborted(f"the first transfer did not complete: {sample.outcome}")
    log.info("system ready (%d worker(s), group stable) in %.1f s", cfg.workers,
             cfg.start_timeout - (deadline - loop.time()))


async def drive(system: IsolatedSystem, gateway: BenchGateway, vus: VirtualUsers,
                cfg: BenchConfig, run_dir: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    meter = machine.CpuMeter(system.pids())
    idle_from = meter.snapshot(loop.time())
    await watch(system, vus, cfg.idle_seconds)
    cpu_idle = machine.CpuMeter.between(idle_from, meter.snapshot(loop.time()))
    start = loop.time()
    vus.start()
    log.info("load: %d virtual users, warm-up %.0f s", cfg.users, cfg.warmup)
    await watch(system, vus, cfg.warmup)
    window_start = loop.time()
    window_start_wall = time.time()
    before = meter.snapshot(window_start)
    requests_before = gateway.requests_sent
    traces_before = read_traces(system)
    recordings = []
    if cfg.profile:
        targets = {**system.worker_pids(), "account-center": system.pids()["account-center"]}
        recordings = [profiling.start(name, pid, cfg.duration, cfg.profile_rate,
                                      run_dir / "profiles") for name, pid in targets.items()]
    log.info("measuring for %.0f s", cfg.duration)
    await watch(system, vus, cfg.duration)
    window_end = loop.time()
    window_wall = (window_start_wall, time.time())
    after = meter.snapshot(window_end)
    traces = {name: traced_worker.diff(traces_before[name], snap)
              for name, snap in read_traces(system).items() if name in traces_before}
    requests_in_window = gateway.requests_sent - requests_before
    cut = await vus.drain(cfg.drain_timeout)
    drained = loop.time()
    log.info("load stopped; in-flight transfers drained in %.1f s%s", drained - window_end,
             f" ({cut} virtual users cut at the deadline)" if cut else "")
    profiles = {rec.name: profiling.finish(rec) for rec in recordings}
    return {"start": start, "windowStart": window_start, "windowEnd": window_end,
            "windowWall": window_wall,
            "cpu": machine.CpuMeter.between(before, after), "cpuIdle": cpu_idle,
            "profiles": profiles,
            "traces": traces,
            "requestsInWindow": requests_in_window, "drainSeconds": drained - window_end,
            "virtualUsersCut": cut}


async def records_per_transfer(settings: Any, transfers: int) -> dict[str, float]:
    """Records written to each topic of the run (any changelog too) per transfer (the
    few readiness probes, transferInit only, are counted in but not as transfers); echo
    topics excluded."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        topics = [t for t in await admin.list_topics()
                  if (t.startswith(settings.topic_prefix) or t.startswith(settings.app_id))
                  and ".echo." not in t]
        described = await admin.describe_topics(topics)
        tps = [TopicPartition(t["topic"], p["partition"]) for t in described
               for p in t.get("partitions", [])]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
    finally:
        await consumer.stop()
        await admin.close()
    counts: Counter[str] = Counter()
    for tp in tps:
        counts[tp.topic.removeprefix(settings.topic_prefix)] += ends[tp] - begins[tp]
    per = {topic: round(n / max(1, transfers), 2) for topic, n in sorted(counts.items()) if n}
    per["total"] = round(sum(counts.values()) / max(1, transfers), 2)
    return per


def read_traces(system: IsolatedSystem) -> dict[str, Any]:
    """The latest cumulative timers of each traced worker (``--trace``)."""
    if not (system.cfg.trace or system.cfg.experiments):
        return {}
    found = {}
    for name in system.worker_pids():
        path = system.trace_file(name)
        if path.exists():
            found[name] = orjson.loads(path.read_bytes())
    return found


def echo_topics(settings: Any) -> tuple[str, str]:
    return settings.topic("echo.requests"), settings.topic("echo.replies")


async def measure_echo(system: IsolatedSystem, cfg: BenchConfig, request_size: int,
                       reply_size: int) -> EchoResult | None:
    s = system.settings
    requests, replies = echo_topics(s)
    await system.create_topics(requests, replies)
    server = system.start_process("echo-server", server_command(
        s.kafka_bootstrap_servers, requests, replies, f"{s.app_id}-echo", reply_size,
        cfg.event_loop))
    client = EchoClient(s.kafka_bootstrap_servers, requests, replies, request_size)
    try:
        await client.start()
        await client.ready(cfg.start_timeout)
        log.info("echo: K=%d, request %d B, reply %d B, %.0f s + %.0f s warm-up", cfg.users,
                 request_size, reply_size, cfg.echo_duration, cfg.echo_warmup)
        meter = machine.CpuMeter({"echo server": server.pid})
        loop = asyncio.get_running_loop()
        before = meter.snapshot(loop.time())
        result = await client.run(cfg.users, cfg.echo_warmup, cfg.echo_duration,
                                  cfg.request_timeout)
        result.cpu = machine.CpuMeter.between(before, meter.snapshot(loop.time()))
        return result
    except TimeoutError:
        log.error("echo server never answered: see %s", system.logdir / "echo-server.log")
        return None
    finally:
        await client.stop()
        await system.stop_all(timeout=15)


def figures(cfg: BenchConfig, vus: VirtualUsers | None, load: dict[str, Any],
            gateway: BenchGateway, echo: EchoResult | None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The figures of result.json, and the series the PNG is drawn from."""
    samples: list[TransferSample] = vus.samples if vus is not None else []
    start, w0, w1 = (load.get("start", 0.0), load.get("windowStart", 0.0),
                     load.get("windowEnd", 0.0))
    window = max(0.0, w1 - w0)
    inside = [s for s in samples if s.finished_at is not None and w0 <= s.finished_at < w1]
    completed = [s for s in inside if s.outcome == COMPLETED]
    init_done = [s for s in samples if s.init_latency is not None
                 and w0 <= s.started_at + s.init_latency < w1]
    no_otp = [s.final_latency for s in inside if not s.otp_used and s.final_latency is not None]
    with_otp = [s.final_latency for s in inside if s.otp_used and s.final_latency is not None]
    errors_in_window: Counter[str] = Counter(
        f"{s.step}:{s.outcome}" for s in samples if s.outcome != COMPLETED
        and (s.finished_at or s.started_at) >= w0 and (s.finished_at or s.started_at) < w1)
    rate = len(completed) / window if window else 0.0
    requests_rate = load.get("requestsInWindow", 0) / window if window else 0.0
    figs: dict[str, Any] = {
        "measuredSeconds": round(window, 2),
        "completedInWindow": len(completed),
        "completedPerSecond": round(rate, 2),
        "requestsPerSecond": round(requests_rate, 2),
        "requestsPerTransfer": round(requests_rate / rate, 3) if rate else None,
        "otpShareObserved": round(sum(s.otp_used for s in completed) / len(completed), 4)
        if completed else None,
        "latency": {
            "transferInit": latency_summary(s.init_latency for s in init_done),  # type: ignore[misc]
            "confirmToFinal": latency_summary(no_otp + with_otp),
            "confirmToFinalNoOtp": latency_summary(no_otp),
            "verifyOtpToFinal": latency_summary(with_otp),
            "confirmToOtpRequired": latency_summary(
                s.confirm_latency for s in inside if s.otp_used
                and s.confirm_latency is not None),
            "otpNotificationWait": latency_summary(
                s.otp_wait for s in inside if s.otp_wait is not None),
            "wholeTransfer": latency_summary(
                s.finished_at - s.started_at for s in completed  # type: ignore[operator]
            ),
        },
        "errorsInWindow": dict(errors_in_window),
        "errorsTotal": {f"{step}:{code}": n for (step, code), n in
                        (vus.errors.items() if vus is not None else [])},
        "transfersTotal": len(samples),
        "drainSeconds": round(load.get("drainSeconds", 0.0), 2),
        "virtualUsersCut": load.get("virtualUsersCut", 0),
        "cpu": load.get("cpu"),
        #: The same processes with no load, just before it started (fixed costs).
        "cpuIdle": load.get("cpuIdle"),
        "kafkaRecordsPerTransfer": load.get("recordsPerTransfer"),
        #: confirm → final reply, hop by hop, from the records' timestamps (bench/hops.py).
        "hops": load.get("hops"),
        "profiles": load.get("profiles") or None,
        "traces": load.get("traces") or None,
        "duplicateOrLateReplies": gateway.other_replies,
        #: How the load generator batched (bench/gateway.py): fetches, produce requests.
        "loadGenerator": gateway.stats(),
    }
    if rate and figs["cpu"]:
        figs["cpuMillisecondsPerTransfer"] = {
            name: round(1000 * cores / rate, 3)
            for name, cores in figs["cpu"]["coresByProcess"].items()}
    seconds = int(cfg.warmup + cfg.duration) + 1
    series: dict[str, Any] = {
        "init": [s.init_latency for s in init_done],
        "finalNoOtp": no_otp, "finalOtp": with_otp,
        "completedPerSecond": per_second(
            (s.finished_at for s in samples if s.outcome == COMPLETED
             and s.finished_at is not None), start, seconds),
    }
    if echo is not None:
        figs["echo"] = {
            "roundTripsPerSecond": round(echo.rate, 2),
            "roundTrips": echo.round_trips,
            "measuredSeconds": echo.window,
            "timeouts": echo.timeouts,
            "latency": latency_summary(echo.latencies),
            "perSecond": echo.per_second,
            "cpu": echo.cpu,
        }
        figs["ratioPerTransfer"] = round(rate / echo.rate, 4) if echo.rate else None
        figs["ratioPerRequest"] = round(requests_rate / echo.rate, 4) if echo.rate else None
        series["echo"] = echo.latencies
    figs["completedPerSecondSeries"] = series["completedPerSecond"]
    return figs, series
