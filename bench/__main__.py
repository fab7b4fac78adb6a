"""``python -m bench``: the end-to-end benchmark (what ``make bench`` runs).

Needs the broker and the database of ``make up`` (``.local/env``) or
``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL``. Exit 0 when every check passed, 1 when a
check failed (money, stuck transfers, errors, a process died), 2 on bad arguments.
See docs/performance.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bench.config import RESULTS_DIR, BenchConfig
from bench.traced_worker import EXPERIMENTS

DEFAULTS = BenchConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=DEFAULTS.duration,
                   help="measured window, seconds")
    p.add_argument("--warmup", type=float, default=DEFAULTS.warmup,
                   help="load before the measured window, seconds")
    p.add_argument("-k", "--users", type=int, default=DEFAULTS.users,
                   help="K: concurrent virtual users (closed loop, one transfer at a time)")
    p.add_argument("-a", "--accounts", type=int, default=DEFAULTS.accounts,
                   help="A: seeded users, one funded account each")
    p.add_argument("--otp-share", type=float, default=DEFAULTS.otp_share,
                   help="share of transfers above the OTP threshold (0..1)")
    p.add_argument("--partitions", type=int, default=DEFAULTS.partitions,
                   help="partitions of every topic of the run")
    p.add_argument("--workers", type=int, choices=(1, 2), default=DEFAULTS.workers,
                   help="worker processes (one consumer group)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seed of the virtual users' random choices")
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                   help="where <timestamp>/ goes")
    p.add_argument("--label", default="", help="a word added to the results directory and "
                   "the docs line")
    p.add_argument("--skip-echo", action="store_true", help="do not measure the echo ceiling")
    p.add_argument("--echo-duration", type=float, default=DEFAULTS.echo_duration,
                   help="measured window of the echo, seconds")
    p.add_argument("--echo-warmup", type=float, default=DEFAULTS.echo_warmup,
                   help="echo load before its window, seconds")
    p.add_argument("--profile", action="store_true",
                   help="py-spy profiles of the worker(s) and the account center over the "
                   "measured window (needs `pip install py-spy`)")
    p.add_argument("--trace", action="store_true",
                   help="wall-clock timers around the worker's service layer and SQL "
                   "statement counts (bench/traced_worker.py)")
    p.add_argument("--experiment", action="append", default=[], metavar="NAME",
                   choices=sorted(EXPERIMENTS),
                   help="a measurement-only variant of the worker, to price a proposed "
                   "change (implies --trace; repeatable): %(choices)s")
    p.add_argument("--profile-rate", type=int, default=DEFAULTS.profile_rate,
                   help="py-spy samples per second")
    p.add_argument("--table-store", default=DEFAULTS.table_store,
                   help="BIZ_TABLE_STORE of the workers")
    p.add_argument("--event-loop", default=DEFAULTS.event_loop, choices=("uvloop", "asyncio"),
                   help="BIZ_EVENT_LOOP of every process of the run, the load generator's "
                   "and the echo's loop")
    p.add_argument("--request-timeout", type=float, default=DEFAULTS.request_timeout,
                   help="seconds a virtual user waits for one reply")
    p.add_argument("--drain-timeout", type=float, default=DEFAULTS.drain_timeout,
                   help="seconds for the transfers in flight to finish after the window")
    p.add_argument("--idle-seconds", type=float, default=DEFAULTS.idle_seconds,
                   help="CPU of the processes measured with no load before the warm-up")
    p.add_argument("--quiesce-timeout", type=float, default=DEFAULTS.quiesce_timeout,
                   help="seconds for the system to become quiet before the money checks")
    p.add_argument("--start-timeout", type=float, default=DEFAULTS.start_timeout,
                   help="seconds for the processes to become ready")
    p.add_argument("--log-level", default=DEFAULTS.log_level,
                   help="BIZ_LOG_LEVEL of the worker(s) and the account center")
    p.add_argument("--keep", action="store_true",
                   help="keep the run's topics and schemas (dropped by default)")
    p.add_argument("--no-doc", action="store_true",
                   help="do not append the run to docs/performance.md")
    return p


def config_from(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        duration=args.duration, warmup=args.warmup, users=args.users, accounts=args.accounts,
        otp_share=args.otp_share, partitions=args.partitions, workers=args.workers,
        seed=args.seed, output_dir=args.output_dir.absolute(), skip_echo=args.skip_echo,
        echo_duration=args.echo_duration, echo_warmup=args.echo_warmup, profile=args.profile,
        profile_rate=args.profile_rate, trace=args.trace,
        experiments=tuple(args.experiment), table_store=args.table_store,
        event_loop=args.event_loop,
        request_timeout=args.request_timeout, drain_timeout=args.drain_timeout,
        idle_seconds=args.idle_seconds,
        quiesce_timeout=args.quiesce_timeout, start_timeout=args.start_timeout,
        log_level=args.log_level, keep=args.keep, append_doc=not args.no_doc,
        label=args.label,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.otp_share <= 1:
        parser.error("--otp-share must be between 0 and 1")
    if args.users < 1 or args.accounts < 2 or args.partitions < 1:
        parser.error("need --users ≥ 1, --accounts ≥ 2, --partitions ≥ 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("need --duration > 0 and --warmup ≥ 0")
    if args.label and not args.label.replace("-", "").isalnum():
        parser.error("--label: letters, digits and dashes only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    from app import collector
    from app.event_loop import install_event_loop
    from bench.run import run  # after the arguments: --help needs no broker or database

    install_event_loop(args.event_loop)
    collector.settle(collector.DEFAULT_GEN0)  # as the processes it measures do
    return asyncio.run(run(config_from(args)))


if __name__ == "__main__":
    sys.exit(main())
