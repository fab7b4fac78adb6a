"""The ``bizcenter`` command.

    bizcenter worker           the business worker (Faust): sagas, replies
    bizcenter account-center   the reference account center (PostgreSQL ledger)
    bizcenter funding-provider the reference funding provider (bank accounts, cards)
    bizcenter create-topics    create every topic with explicit partition counts
    bizcenter migrate          create the PostgreSQL schemas and tables
    bizcenter ping             health check: the broker and the database answer
    bizcenter reconcile        check once that the ledger's money adds up (exit 0 or 1)
    bizcenter config           the effective configuration, secrets masked
    bizcenter sagas ...        list, show and resolve (MANUAL_REVIEW) transfer sagas
    bizcenter dlq ...          list and show dead letters
    bizcenter seed-demo        demo users in the directory and funded accounts
    bizcenter token USER       a development access token (stands in for the user center)
    bizcenter transfer ...     a transfer through the gateway protocol, end to end
    bizcenter topup ...        a top-up from a linked card or bank account
    bizcenter run              everything above for a local demo (what `make run` runs)
"""

# Why one module: it is the ``bizcenter`` command, its parser and one short ``cmd_*``
# function per subcommand, so a subcommand is found by name in :func:`build_parser` and its
# handler in the same file; the environment rules (``DEVELOPMENT_ONLY``, ``SECRET_FREE``)
# sit beside the commands they name. The operator commands, which read PostgreSQL and Kafka
# themselves, are apart (cli/operator_commands.py). The demo tools (``seed-demo``,
# ``token``, ``transfer``, ``topup``, ``run``: about 200 lines) are the one seam left; they
# use :func:`prepare`, which the worker's command uses too, so splitting them off needs a
# third module for it. (A comment, not in the docstring: the docstring is ``bizcenter
# --help``.)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

from pydantic import ValidationError

from app import collector, log_format, log_redaction
from app.event_loop import install_event_loop
from app.settings import EXIT_CONFIG, Settings, load_settings

log = logging.getLogger("bizcenter")

#: Commands that stand in for other systems with development data (the user center's
#: tokens, demo users with a known PIN): refused in production whatever the secrets.
DEVELOPMENT_ONLY = frozenset({"token", "transfer", "topup", "seed-demo", "run"})
#: Operator commands that use no secret: they run whatever the secrets (``config`` is how
#: an operator sees which secret is unset; ``sagas list|show`` read the sagas' rows in
#: PostgreSQL (``show`` also a topic), ``dlq`` reads topics; ``users unlock`` updates
#: PostgreSQL rows).
SECRET_FREE = frozenset({"config", "reconcile", "sagas list", "sagas show", "dlq list",
                         "dlq show", "users unlock"})
#: Commands that use only some secrets: only those are checked. Every other command (the
#: worker, the account center, the funding provider, ...) needs them all.
SECRETS_OF = {"sagas resolve": frozenset({"BIZ_OPERATOR_SECRET"})}


def command_name(args: argparse.Namespace) -> str:
    """``sagas resolve``, ``dlq list``, ``worker``: the command and its subcommand."""
    sub = getattr(args, f"{args.command.replace('-', '_')}_command", None)
    return f"{args.command} {sub}" if isinstance(sub, str) else str(args.command)


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=log_format.TEXT_FORMAT)
    log_redaction.install()
    log_format.install(settings.log_format)


def environment_refusal(settings: Settings, command: str) -> str | None:
    """The one-line reason this command must not start in this environment, or None."""
    if settings.environment != "production" or command in SECRET_FREE:
        return None
    if command in DEVELOPMENT_ONLY:
        return (f"bizcenter {command}: refused with BIZ_ENVIRONMENT=production (a "
                f"development tool; set BIZ_ENVIRONMENT=development on a local system)")
    problems = settings.production_problems(SECRETS_OF.get(command))
    if not problems:
        return None
    return (f"bizcenter {command}: refusing to start with BIZ_ENVIRONMENT=production: "
            f"{'; '.join(problems)} (set them to random secrets, see README \"Secrets in "
            f"production\"; or BIZ_ENVIRONMENT=development on a local system)")


async def prepare(settings: Settings, *, ledger: bool = False) -> None:
    """Topics and tables: idempotent, safe to run from several processes at once."""
    from app.adapters.postgres_store import PostgresBusinessStore
    from events.topics import ensure_topics

    await ensure_topics(settings)
    store = PostgresBusinessStore.from_settings(settings)
    try:
        await store.migrate()
    finally:
        await store.close()
    if ledger:
        from reference.account_center.ledger import Ledger

        led = Ledger.from_settings(settings)
        try:
            await led.migrate()
        finally:
            await led.close()


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from agents.worker import run_worker

    if settings.environment == "development":
        log.warning("BIZ_ENVIRONMENT=development: the development secrets are accepted")
    asyncio.run(prepare(settings))
    return run_worker(settings)


def cmd_account_center(settings: Settings, args: argparse.Namespace) -> int:
    from reference.account_center.service import run_account_center

    async def main() -> None:
        await prepare(settings, ledger=True)
        collector.settle(settings.gc_gen0_threshold)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_account_center(settings, stop=stop)

    asyncio.run(main())
    return 0


def cmd_ping(settings: Settings, args: argparse.Namespace) -> int:
    """Health check: the broker answers a metadata request and PostgreSQL a query."""
    from aiokafka.admin import AIOKafkaAdminClient
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def check() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()
        engine = create_async_engine(settings.database_url, hide_parameters=True)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    try:
        asyncio.run(asyncio.wait_for(check(), 15))
    except Exception as exc:
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("ok")
    return 0


#: Exit statuses of ``bizcenter reconcile``.
RECONCILE_BALANCED, RECONCILE_DRIFT, RECONCILE_UNCHECKED = 0, 1, 2


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """The ledger's money checks, once: 0 balanced, 1 drift (with a table of what differs),
    2 when the ledger cannot be read."""
    from app.reconciliation import Report, reconcile
    from reference.account_center.ledger import Ledger

    async def check() -> Report:
        ledger = Ledger.from_settings(settings, pool_size=1)
        try:
            return await reconcile(ledger.engine)
        finally:
            await ledger.close()

    try:
        report = asyncio.run(asyncio.wait_for(check(), 60))
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        print(f"bizcenter reconcile: cannot read the ledger: {type(exc).__name__}: "
              f"{first_line}", file=sys.stderr)
        return RECONCILE_UNCHECKED
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.as_table())
    return RECONCILE_BALANCED if report.balanced else RECONCILE_DRIFT


def cmd_users_unlock(settings: Settings, args: argparse.Namespace) -> int:
    """Operator: end USER's PIN lock (and reset the count) and forget their wrong OTPs (the
    OTP lock). Exit 0 done, 1 no such user."""
    from app.adapters.postgres_store import PostgresBusinessStore

    async def unlock() -> bool:
        store = PostgresBusinessStore.from_settings(settings)
        try:
            await store.migrate()
            return await store.unlock_user(args.user)
        finally:
            await store.close()

    if not asyncio.run(unlock()):
        print(f"bizcenter users unlock: no user {args.user!r}", file=sys.stderr)
        return 1
    print(f"{args.user}: PIN and OTP unlocked")
    return 0


def effective_configuration(settings: Settings) -> dict[str, Any]:
    """Every setting by its variable name, secrets masked: a secret shows only whether it
    is unset, a development placeholder or set (with its length); the database URL's
    password is masked."""
    from pydantic import SecretStr
    from sqlalchemy.engine import make_url

    from app.settings import DEV_SECRETS

    config: dict[str, Any] = {}
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        variable = (alias.choices[0] if alias is not None and hasattr(alias, "choices")
                    else f"BIZ_{name.upper()}")
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            value = ("(unset)" if not secret else "(development placeholder)"
                     if secret in DEV_SECRETS else f"(set, {len(secret.encode())} bytes)")
        elif name == "database_url":
            try:
                value = make_url(value).render_as_string(hide_password=True)
            except Exception:
                value = "(unparseable, masked)"
        config[str(variable)] = value
    return config


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    config = effective_configuration(settings)
    if args.json:
        print(json.dumps(config, indent=2))
    else:
        width = max(len(k) for k in config)
        for key, value in config.items():
            shown = json.dumps(value) if isinstance(value, list | bool) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bizcenter")
    except PackageNotFoundError:
        return "unknown"


def cmd_funding_provider(settings: Settings, args: argparse.Namespace) -> int:
    from events.topics import ensure_topics
    from reference.funding_provider import run_funding_provider

    async def main() -> None:
        await ensure_topics(settings)
        collector.settle(settings.gc_gen0_threshold)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_funding_provider(settings, stop=stop)

    asyncio.run(main())
    return 0


def cmd_create_topics(settings: Settings, args: argparse.Namespace) -> int:
    from events.topics import ensure_topics

    created = asyncio.run(ensure_topics(settings))
    print("created: " + (", ".join(created) if created else "nothing (all exist)"))
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(prepare(settings, ledger=True))
    return 0


async def seed_demo(settings: Settings) -> None:
    from app.adapters.postgres_store import PostgresBusinessStore
    from events.topics import ensure_topics
    from reference.account_center.ledger import Ledger
    from reference.account_center.service import announce_openings
    from reference.demo_seed import DEMO_USERS, seed_directory

    store = PostgresBusinessStore.from_settings(settings)
    ledger = Ledger.from_settings(settings)
    try:
        await store.migrate()
        await ledger.migrate()
        await seed_directory(store, settings.pin_pepper.get_secret_value().encode(), DEMO_USERS)
        for user in DEMO_USERS:
            await ledger.open_account(user.account_id, user.currency, user.initial_balance_minor)
        await ensure_topics(settings)
        await announce_openings(settings, ledger, [u.account_id for u in DEMO_USERS])
    finally:
        await store.close()
        await ledger.close()


def cmd_seed_demo(settings: Settings, args: argparse.Namespace) -> int:
    from reference.demo_seed import DEMO_USERS

    asyncio.run(seed_demo(settings))
    for user in DEMO_USERS:
        print(f"{user.user_id}: account {user.account_id}, PIN {user.pin}, "
              f"balance {user.initial_balance_minor} minor {user.currency}")
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from reference.user_center import issue_access_token

    print(issue_access_token(settings, args.user, ttl_seconds=args.ttl))
    return 0


async def run_transfer(
    settings: Settings, *, user: str, to: str, amount: int, currency: str, pin: str,
    otp_from_topic: bool, timeout: float = 60.0, source: str | None = None,
) -> dict[str, Any]:
    """As a gateway would: transferInit → transferConfirm → (verifyOtp), or, with
    ``source``, topUp → (verifyOtp). Returns the outcome."""
    from reference.gateway_client import GatewayClient, TopicTail
    from reference.user_center import issue_access_token

    token = issue_access_token(settings, user)
    client = GatewayClient(settings)
    otps = TopicTail(settings, settings.topic("notifications.otp"))
    await client.start()
    await otps.start()

    def show(name: str, reply: dict[str, Any]) -> None:
        print(f"{name:<15} → {reply['status']} {reply.get('code') or ''}".rstrip())

    try:
        key = str(uuid.uuid4())
        if source is not None:
            reply = await client.request(client.top_up_envelope(
                user, token, funding_source_id=source, amount_minor=amount,
                currency=currency, pin=pin, idempotency_key=key), timeout)
            show("topUp", reply)
        else:
            init = await client.request(client.envelope(
                "transferInit", user, token,
                {"toAccountId": to, "amountMinor": amount, "currency": currency}), timeout)
            show("transferInit", init)
            if init["status"] != "ok":
                return init
            reply = await client.request(client.envelope(
                "transferConfirm", user, token,
                {"transferToken": init["data"]["transferToken"], "pin": pin},
                idempotency_key=key), timeout)
            show("transferConfirm", reply)
        if reply.get("code") == "OTP_REQUIRED":
            transfer_id = reply["data"]["transferId"]
            if otp_from_topic:
                found = await otps.wait(lambda msgs: next(
                    (v for _k, v in msgs if v.get("transferId") == transfer_id), None), timeout)
                otp = found["otp"]
                print("                  (demo: OTP read from notifications.otp)")
            else:
                otp = (await asyncio.to_thread(input, "OTP sent to your phone: ")).strip()
            reply = await client.request(client.envelope(
                "verifyOtp", user, token, {"otp": otp}, idempotency_key=key), timeout)
            show("verifyOtp", reply)
        print(f"outcome: {reply.get('data')}")
        return reply
    finally:
        await otps.stop()
        await client.stop()


def cmd_transfer(settings: Settings, args: argparse.Namespace) -> int:
    reply = asyncio.run(run_transfer(
        settings, user=args.user, to=args.to, amount=args.amount, currency=args.currency,
        pin=args.pin, otp_from_topic=args.otp_from_topic,
    ))
    return 0 if reply.get("status") == "ok" else 1


def cmd_topup(settings: Settings, args: argparse.Namespace) -> int:
    reply = asyncio.run(run_transfer(
        settings, user=args.user, to="", amount=args.amount, currency=args.currency,
        pin=args.pin,
        otp_from_topic=args.otp_from_topic, source=args.source,
    ))
    return 0 if reply.get("status") == "ok" else 1


#: Where ``bizcenter run`` writes its child processes' logs (one file each; the previous
#: run's as ``<name>.log.1``).
RUN_LOG_DIR = os.path.join(".local", "logs")
RUN_CHILDREN = ("account-center", "funding-provider", "worker")


async def demo_balances(settings: Settings) -> dict[str, int | None]:
    from reference.account_center.ledger import Ledger
    from reference.demo_seed import DEMO_USERS

    ledger = Ledger.from_settings(settings, pool_size=1)
    try:
        return {u.account_id: await ledger.balance(u.account_id) for u in DEMO_USERS}
    finally:
        await ledger.close()


def _print_balances(title: str, balances: dict[str, int | None]) -> None:
    shown = "  ".join(f"{account} {'-' if minor is None else f'{minor / 100:,.2f}'}"
                      for account, minor in balances.items())
    print(f"{title:<16}{shown}  (USD)")


def _start_child(exe: list[str], name: str) -> subprocess.Popen[bytes]:
    os.makedirs(RUN_LOG_DIR, exist_ok=True)
    path = os.path.join(RUN_LOG_DIR, f"{name}.log")
    if os.path.exists(path):
        os.replace(path, path + ".1")
    with open(path, "ab") as out:
        return subprocess.Popen([*exe, name], env=os.environ.copy(),  # noqa: S603
                                stdout=out, stderr=subprocess.STDOUT)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """The local system in one command: the account center, the funding provider and the
    worker as child processes (their logs in ``.local/logs/``), demo transfers and a top-up
    through them with the balances before and after, then all stay up until Ctrl-C."""
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(prepare(settings, ledger=True))
    asyncio.run(seed_demo(settings))
    exe = [sys.executable, "-m", "cli"]
    children = [_start_child(exe, name) for name in RUN_CHILDREN]
    print(f"\nstarted {', '.join(RUN_CHILDREN)}; their logs: "
          + ", ".join(os.path.join(RUN_LOG_DIR, f"{n}.log") for n in RUN_CHILDREN))
    try:
        _print_balances("balances before", asyncio.run(demo_balances(settings)))
        print("\n=== demo: alice sends 12.50 USD to bob, then 750.00 USD (OTP step-up) ===\n")
        for amount in (1250, 75000):
            asyncio.run(run_transfer(
                settings, user="alice", to="acc-bob", amount=amount, currency="USD",
                pin="123456", otp_from_topic=True, timeout=120.0,
            ))
        print("\n=== demo: bob tops up 40.00 USD from his card ===\n")
        asyncio.run(run_transfer(
            settings, user="bob", to="", amount=4000, currency="USD", pin="123456",
            otp_from_topic=True, timeout=120.0, source="card-bob",
        ))
        print()
        _print_balances("balances after", asyncio.run(demo_balances(settings)))
        print(f"\nThe worker, the account center and the funding provider are running "
              f"(logs in {RUN_LOG_DIR}/; worker health: "
              f"http://127.0.0.1:{settings.web_port}/readyz). Ctrl-C stops them.\n"
              "Try: .venv/bin/bizcenter transfer --user bob --to acc-carol --amount 500\n"
              "     .venv/bin/bizcenter topup --user carol --source card-carol --amount 2000\n")
        while all(child.poll() is None for child in children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[-1].wait(timeout=1.0)
        return 1  # a child died on its own
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bizcenter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"bizcenter {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run the business worker (Faust)").set_defaults(fn=cmd_worker)
    sub.add_parser("account-center", help="run the reference account center").set_defaults(
        fn=cmd_account_center)
    sub.add_parser("funding-provider", help="run the reference funding provider").set_defaults(
        fn=cmd_funding_provider)
    sub.add_parser("create-topics", help="create the topics").set_defaults(fn=cmd_create_topics)
    sub.add_parser("ping", help="health check of Kafka and PostgreSQL").set_defaults(
        fn=cmd_ping)
    reconcile_cmd = sub.add_parser(
        "reconcile", help="check once that the ledger's money adds up",
        description="The ledger's checks, once: money conserved (balances = seeded + "
        "funded - clearing), clearing account zero, journal balanced per command, "
        "balances = journal. Exit 0 balanced, 1 drift (with a table of what differs), "
        "2 the ledger cannot be read.")
    reconcile_cmd.add_argument("--json", action="store_true", help="the report as JSON")
    reconcile_cmd.set_defaults(fn=cmd_reconcile)
    config_cmd = sub.add_parser(
        "config", help="the effective configuration, secrets masked",
        description="Every setting (environment, then env file, then default) by its "
        "variable name; secrets show only unset / development placeholder / set.")
    config_cmd.add_argument("--json", action="store_true", help="as a JSON object")
    config_cmd.set_defaults(fn=cmd_config)
    users_cmd = sub.add_parser("users", help="operator tools for users").add_subparsers(
        dest="users_command", required=True)
    unlock_cmd = users_cmd.add_parser(
        "unlock", help="end USER's PIN lock and OTP lock",
        description="Reset USER's wrong-PIN count, end the PIN lock and forget the wrong "
        "OTPs that lock step-ups (both locks also end by themselves, see "
        "BIZ_PIN_LOCK_SECONDS and BIZ_OTP_FAILURE_WINDOW_SECONDS).")
    unlock_cmd.add_argument("user")
    unlock_cmd.set_defaults(fn=cmd_users_unlock)
    from cli.operator_commands import add_parsers as add_operator_parsers

    add_operator_parsers(sub)  # sagas list|show|resolve, dlq list|show
    sub.add_parser("migrate", help="create the database tables").set_defaults(fn=cmd_migrate)
    from cli.upgrade import add_parser as add_upgrade_parser

    add_upgrade_parser(sub)  # upgrade-query-tables
    sub.add_parser("seed-demo", help="demo users and funded accounts").set_defaults(
        fn=cmd_seed_demo)
    token = sub.add_parser("token", help="a development access token for USER")
    token.add_argument("user")
    token.add_argument("--ttl", type=int, default=900)
    token.set_defaults(fn=cmd_token)
    transfer = sub.add_parser("transfer", help="a transfer through the gateway protocol")
    transfer.add_argument("--user", required=True, help="payer user id (e.g. alice)")
    transfer.add_argument("--to", required=True, help="payee account id (e.g. acc-bob)")
    transfer.add_argument("--amount", type=int, required=True, help="minor units (cents)")
    transfer.add_argument("--currency", default="USD")
    transfer.add_argument("--pin", default="123456")
    transfer.add_argument("--otp-from-topic", action="store_true",
                          help="demo only: read the OTP from notifications.otp")
    transfer.set_defaults(fn=cmd_transfer)
    topup = sub.add_parser("topup", help="a top-up from a linked card or bank account")
    topup.add_argument("--user", required=True, help="user id (e.g. alice)")
    topup.add_argument("--source", required=True, help="funding source (e.g. card-alice)")
    topup.add_argument("--amount", type=int, required=True, help="minor units (cents)")
    topup.add_argument("--currency", default="USD")
    topup.add_argument("--pin", default="123456", help="confirms the top-up, as a transfer")
    topup.add_argument("--otp-from-topic", action="store_true",
                       help="demo only: read the OTP from notifications.otp")
    topup.set_defaults(fn=cmd_topup)
    sub.add_parser("run", help="the whole local system plus a demo transfer").set_defaults(
        fn=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValidationError as exc:  # without the input: it may be a secret
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False))
        print(f"bizcenter {args.command}: invalid settings: {reasons}", file=sys.stderr)
        return EXIT_CONFIG
    refusal = environment_refusal(settings, command_name(args))
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(settings)
    install_event_loop(settings.event_loop)
    return int(args.fn(settings, args))


if __name__ == "__main__":
    sys.exit(main())
