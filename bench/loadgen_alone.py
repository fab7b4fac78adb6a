"""The load generator on its own: what it costs per transfer when the business center is not
the limit.

``bench/responder.py`` (one process: a consumer group on ``business.commands``, a batching
producer) stands in for the business center: it answers every command at once with
well-formed replies, OTP notifications and transfer events in about the real numbers and
sizes. The generator is the benchmark's own (``bench.gateway.BenchGateway`` and
``bench.virtual_users.VirtualUsers``, the same code as ``python -m bench``), paced to a
target rate of transfer starts (``--rate``; K virtual users, closed loop, each waiting for
its slot; the starts due in the same ``--tick-ms`` leave together), 10 % of transfers with an OTP
step. Over the window the CPU of the generator (this process), the responder and the broker
is read from ``/proc`` (``bench.machine.CpuMeter``) and divided by the transfers completed
in it.

    python -m bench.loadgen_alone --rate 1000 --duration 20 --warmup 5 [--runs 2] [--profile]

Topics of the run: ``loadgen<time><random>.*``, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import machine, profiling
from bench.config import RESULTS_DIR, ROOT, BenchConfig
from bench.gateway import BenchGateway
from bench.isolated_system import SeededUser, base_settings
from bench.responder import command as responder_command
from bench.stats import latency_summary
from bench.virtual_users import COMPLETED, VirtualUsers
from reference.system_harness import start_child
from reference.user_center import issue_access_token

log = logging.getLogger("bench.loadgen")

TOPICS = ("business.commands", "business.replies", "notifications.otp",
          "business.transfer-events")


class Pacer:
    """Hands out transfer start times ``1/rate`` apart, released in ticks of ``tick``
    seconds (the starts due in a tick leave together, as the next requests of a closed loop
    leave together when a batch of replies is read): a fixed rate as long as a virtual user
    is free for every slot. One timer per tick, not per transfer."""

    def __init__(self, rate: float, tick: float) -> None:
        self.interval = 1.0 / rate
        self.tick = tick
        self.next = 0.0
        self._ticks: dict[int, asyncio.Future[None]] = {}

    async def slot(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = self.next = max(now, self.next + self.interval)
        if at <= now:
            return
        n = int(at / self.tick) + 1
        fut = self._ticks.get(n)
        if fut is None:
            fut = self._ticks[n] = loop.create_future()
            loop.call_at(n * self.tick, self._release, n)
        await fut

    def _release(self, n: int) -> None:
        fut = self._ticks.pop(n)
        if not fut.done():
            fut.set_result(None)


class PacedUsers(VirtualUsers):
    def __init__(self, cfg: BenchConfig, gateway: BenchGateway, users: list[SeededUser],
                 rate: float, tick: float) -> None:
        super().__init__(cfg, gateway, users)
        self.pacer = Pacer(rate, tick)

    async def _run(self, vu: int, rng: random.Random) -> None:
        while not self.stop_new.is_set():
            await self.pacer.slot()
            if self.stop_new.is_set():
                return
            await self.transfer(vu, rng)


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            described = await admin.describe_topics(names)
            if all(t.get("partitions") and all(p.get("leader", -1) >= 0
                                               for p in t["partitions"]) for t in described):
                return
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def ready(gateway: BenchGateway, users: list[SeededUser], partitions: int,
                timeout: float) -> None:
    """Every partition of business.commands answers (the responder's group has formed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    payer, payee = users[0], users[1]
    for partition in range(partitions):
        while True:
            env = gateway.envelope("transferInit", payer.user_id, payer.token, {
                "toAccountId": payee.account_id, "amountMinor": 100, "currency": "USD"})
            try:
                await gateway.request(env, 3.0, partition=partition)
                break
            except TimeoutError:
                if loop.time() > deadline:
                    raise


async def one_run(args: argparse.Namespace, rate: float, out_dir: Path) -> dict[str, Any]:
    base = base_settings()
    bootstrap = base.kafka_bootstrap_servers
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    prefix = f"loadgen{stamp}{secrets.token_hex(2)}."
    topics = [prefix + t for t in TOPICS]
    await create_topics(bootstrap, topics, args.partitions)
    log_path = out_dir / f"responder-{rate:.0f}.log"
    responder = start_child(
        responder_command(bootstrap, prefix, f"{prefix}responder", args.event_loop),
        env=os.environ, log=log_path, cwd=ROOT)
    gateway = BenchGateway(bootstrap, lambda name: prefix + name)
    cfg = BenchConfig(users=args.users, accounts=args.accounts, otp_share=args.otp_share,
                      partitions=args.partitions, seed=args.seed,
                      request_timeout=args.request_timeout)
    ttl = 3600
    users = [SeededUser(f"u{i:06d}", str(uuid.uuid5(uuid.NAMESPACE_URL, f"acc{i}")),
                        issue_access_token(base, f"u{i:06d}", ttl_seconds=ttl))
             for i in range(args.accounts)]
    vus = PacedUsers(cfg, gateway, users, rate, args.tick_ms / 1000)
    loop = asyncio.get_running_loop()
    try:
        await gateway.start()
        await ready(gateway, users, args.partitions, 60.0)
        meter = machine.CpuMeter({"responder": responder.pid})
        idle_from = meter.snapshot(loop.time())
        await asyncio.sleep(args.idle)
        cpu_idle = machine.CpuMeter.between(idle_from, meter.snapshot(loop.time()))
        vus.start()
        await asyncio.sleep(args.warmup)
        w0 = loop.time()
        before = meter.snapshot(w0)
        recording = None
        if args.profile:
            recording = profiling.start(f"loadgen-{rate:.0f}", os.getpid(),
                                        args.duration, args.profile_rate, out_dir)
        sent_before = gateway.requests_sent
        profiler = None
        if args.cprofile:
            import cProfile

            profiler = cProfile.Profile(time.process_time)  # CPU, not wall time
            profiler.enable()
        await asyncio.sleep(args.duration)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(out_dir / f"loadgen-{rate:.0f}.pstats")
        w1 = loop.time()
        after = meter.snapshot(w1)
        sent = gateway.requests_sent - sent_before
        cut = await vus.drain(args.request_timeout + 5)
        profile = profiling.finish(recording) if recording is not None else None
        sagas = await transfer_events_check(gateway, 30.0)
    finally:
        await gateway.stop()
        responder.terminate()
        try:
            responder.wait(timeout=15)
        except subprocess.TimeoutExpired:
            responder.kill()
        await delete_topics(bootstrap, topics)
    window = w1 - w0
    inside = [s for s in vus.samples if s.finished_at is not None and w0 <= s.finished_at < w1]
    completed = [s for s in inside if s.outcome == COMPLETED]
    done_rate = len(completed) / window
    cpu = machine.CpuMeter.between(before, after)
    ms = {name: round(1000 * cores / done_rate, 4) for name, cores in
          cpu["coresByProcess"].items()} if done_rate else {}
    finals = [s.final_latency for s in inside if s.final_latency is not None]
    result = {
        "targetRate": rate, "users": args.users, "seconds": round(window, 2),
        "completedPerSecond": round(done_rate, 1),
        "requestsPerSecond": round(sent / window, 1),
        "generatorCpuMsPerTransfer": ms.get("bench (load generator)"),
        "cpuMsPerTransfer": ms, "cpu": cpu, "cpuIdle": cpu_idle,
        "errors": {f"{step}:{code}": n for (step, code), n in vus.errors.items()},
        "virtualUsersCut": cut, "transferEvents": sagas,
        "otpShare": round(sum(s.otp_used for s in completed) / len(completed), 3)
        if completed else None,
        "latency": {"transferInit": latency_summary(
                        s.init_latency for s in inside if s.init_latency is not None),
                    "confirmToFinal": latency_summary(finals)},
        "gatewayStats": gateway_stats(gateway),
    }
    if profile is not None:
        result["profile"] = {k: profile[k] for k in ("busyCores", "selfByPackage", "topSelf",
                                                   "topInclusive", "file") if k in profile}
    return result


async def transfer_events_check(gateway: BenchGateway, timeout: float) -> dict[str, Any]:
    """After the load: read business.transfer-events as the bench's checks do (if this
    gateway defers them) and count the transfers not in a final state."""
    caught_up = getattr(gateway, "events_caught_up", None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if caught_up is not None:
        while loop.time() < deadline:
            if await caught_up():
                break
            await asyncio.sleep(0.2)
    else:
        await asyncio.sleep(1.0)
    states = gateway.transfer_states
    return {"transfers": len(states),
            "notFinal": sum(1 for _seq, state in states.values() if state != "COMPLETED")}


def gateway_stats(gateway: BenchGateway) -> dict[str, Any]:
    stats = getattr(gateway, "stats", None)
    return stats() if callable(stats) else {}


def line(r: dict[str, Any]) -> str:
    lat = r["latency"]["confirmToFinal"]
    return (f"rate {r['targetRate']:>5.0f}/s → {r['completedPerSecond']:>7.1f} transfers/s, "
            f"{r['requestsPerSecond']:>7.1f} requests/s; generator "
            f"{r['generatorCpuMsPerTransfer']} ms CPU/transfer "
            f"({r['cpu']['coresByProcess'].get('bench (load generator)')} cores; idle "
            f"{r['cpuIdle']['coresByProcess'].get('bench (load generator)')}); "
            f"responder {r['cpuMsPerTransfer'].get('responder')} ms, kafka "
            f"{r['cpuMsPerTransfer'].get('kafka')} ms; confirm→final p50 "
            f"{lat.get('p50Ms')} p99 {lat.get('p99Ms')} ms; errors {r['errors'] or 0}; "
            f"other {r['cpu']['coresOther']} cores")


async def main_async(args: argparse.Namespace) -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = args.output_dir / f"{stamp}-loadgen{('-' + args.label) if args.label else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for rate in args.rate:
        for i in range(args.runs):
            log.info("rate %.0f/s, run %d of %d", rate, i + 1, args.runs)
            r = await one_run(args, rate, out_dir)
            results.append(r)
            print(line(r), flush=True)
    (out_dir / "result.json").write_text(json.dumps(
        {"commit": machine.git_commit(), "args": {k: str(v) for k, v in vars(args).items()},
         "runs": results}, indent=1))
    print(f"results: {out_dir / 'result.json'}")
    return 1 if any(r["errors"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen_alone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, action="append", help="target transfers/s "
                   "(repeatable; default 1000)")
    p.add_argument("--runs", type=int, default=1, help="runs per rate")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--idle", type=float, default=3.0, help="seconds of CPU with no load")
    p.add_argument("-k", "--users", type=int, default=128,
                   help="virtual users (enough that one is free for every slot)")
    p.add_argument("--tick-ms", type=float, default=10.0,
                   help="transfer starts are released in ticks of this many ms (a closed "
                   "loop's next requests leave together when a batch of replies is read)")
    p.add_argument("-a", "--accounts", type=int, default=1000)
    p.add_argument("--otp-share", type=float, default=0.10)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    p.add_argument("--profile", action="store_true", help="py-spy of the generator")
    p.add_argument("--cprofile", action="store_true",
                   help="cProfile of the generator over the window (deterministic: slows "
                   "it; for the shares of functions, not the CPU figure)")
    p.add_argument("--profile-rate", type=int, default=97)
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    args.rate = args.rate or [1000.0]
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    from app.event_loop import install_event_loop

    install_event_loop(args.event_loop)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
