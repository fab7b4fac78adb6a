"""Spike (issue 13): the CPU floor of a batch saga engine, measured on this machine.

``python -m bench.spike_batch_engine --records 50000 --batch 1,10,100,500``

Not product code. Creates its own topics (``--partitions``) and PostgreSQL schema, pre-produces
N confirm-like commands (~800 B JSON: an HS256 access token per user, a per-transfer HS256
transfer token, an idempotency key, a PIN) from ``--users`` users, then per batch size (each
``--runs`` times) runs the engine in a child process, whose loop is: ``getmany(max_records=B)``
→ orjson + pydantic (``CommandEnvelope``, ``TransferConfirmPayload``) → JWTs (access token
through a verified-token cache, transfer token in full: it is unique per transfer) → ONE
transaction (payers locked ``= ANY … ORDER BY … FOR UPDATE``, sagas read ``= ANY``, decisions in
memory, then one statement: sagas, token claims, reservations, idempotency rows and saved
replies by ``unnest … ON CONFLICT``, the users' reservations aggregated) → a debit command and a
reply per record, sent without awaiting each (futures gathered) → offsets committed.
Reported: records/s; CPU µs per record of the engine (``process_time``), of the broker (its
``/proc`` stat) and of PostgreSQL (every postgres process, and our backend alone); the engine's
CPU by phase; the produce-only figures of the pre-produce; an extrapolation per transfer.
Records per run: ``min(N, max(3000, 400 * B))`` (batch 1 is slow). Cleans up at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
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

import asyncpg
import jwt
import orjson
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.machine import children_of, kafka_pid, machine_cpu, postmaster_pid, process_cpu_seconds
from schemas.wire import AccountCommand, AccountCommandType, CommandEnvelope, TransferConfirmPayload

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("consume", "decode", "jwt_access", "jwt_transfer", "decide", "pg", "produce", "flush",
          "commit")
DDL = """
CREATE TABLE users (user_id text PRIMARY KEY, account_id text NOT NULL, pin_hash bytea NOT NULL,
  pin_failures int NOT NULL DEFAULT 0, daily_limit bigint NOT NULL, reserved bigint NOT NULL);
CREATE TABLE sagas (transfer_id text PRIMARY KEY, idem_key text NOT NULL, payer text NOT NULL,
  amount bigint NOT NULL, state jsonb NOT NULL);
CREATE TABLE token_claims (jti text PRIMARY KEY, transfer_id text NOT NULL);
CREATE TABLE reservations (transfer_id text PRIMARY KEY, user_id text NOT NULL,
  day date NOT NULL, amount bigint NOT NULL);
CREATE TABLE idempotency (operator_id text, idem_key text, transfer_id text NOT NULL,
  PRIMARY KEY (operator_id, idem_key));
CREATE TABLE replies (operator_id text, request_id text, body jsonb NOT NULL,
  PRIMARY KEY (operator_id, request_id));
"""
LOCK_USERS = ("SELECT user_id, account_id, pin_hash, daily_limit, reserved FROM users"
              " WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE")
READ_SAGAS = "SELECT transfer_id, state FROM sagas WHERE transfer_id = ANY($1::text[])"
WRITE_BATCH = """
WITH s AS (INSERT INTO sagas SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
             $4::bigint[], $5::jsonb[]) ON CONFLICT DO NOTHING RETURNING 1),
 c AS (INSERT INTO token_claims SELECT * FROM unnest($6::text[], $1::text[])
       ON CONFLICT DO NOTHING),
 r AS (INSERT INTO reservations SELECT t, u, current_date, a
       FROM unnest($1::text[], $3::text[], $4::bigint[]) AS x(t, u, a) ON CONFLICT DO NOTHING),
 i AS (INSERT INTO idempotency SELECT * FROM unnest($3::text[], $2::text[], $1::text[])
       ON CONFLICT DO NOTHING),
 p AS (INSERT INTO replies SELECT * FROM unnest($7::text[], $8::text[], $9::jsonb[])
       ON CONFLICT DO NOTHING),
 u AS (UPDATE users SET reserved = users.reserved + d.a, pin_failures = 0
       FROM unnest($10::text[], $11::bigint[]) AS d(id, a) WHERE users.user_id = d.id)
SELECT count(*) FROM s"""
TABLES = "sagas, token_claims, reservations, idempotency, replies"
#: History (so that indexes have depth and prepared plans see real statistics: planned on an
#: empty table, ``= ANY`` became a sequential scan, 340 µs per record at batch 100).
SEED = """INSERT INTO sagas SELECT 'h'||g, 'hk'||g, 'user-'||(g%1000), 5, '{"state":"COMPLETED"}'
  FROM generate_series(1, 100000) g;
INSERT INTO token_claims SELECT 'hj'||g, 'h'||g FROM generate_series(1, 100000) g;
INSERT INTO reservations SELECT 'h'||g, 'user-'||(g%1000), current_date - 1, 5
  FROM generate_series(1, 100000) g;
INSERT INTO idempotency SELECT 'user-'||(g%1000), 'hk'||g, 'h'||g FROM generate_series(1, 100000) g;
INSERT INTO replies SELECT 'user-'||(g%1000), 'hr'||g, '{"status":"ok"}'
  FROM generate_series(1, 100000) g;
ANALYZE"""


def _env() -> tuple[str, str]:
    values = dict(os.environ)
    env_file = ROOT / ".local" / "env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values.setdefault(key.strip(), value.strip())
    dsn = values["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    return values.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"), dsn


def _pin_hash(pepper: bytes, pin: str) -> bytes:
    return hmac.new(pepper, pin.encode(), hashlib.sha256).digest()


# ------------------------------------------------------------------------- the engine (child)


async def engine(cfg: dict[str, Any]) -> None:
    conn = await asyncpg.connect(cfg["dsn"], server_settings={"search_path": cfg["schema"]})
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    lock_users, read_sagas = await conn.prepare(LOCK_USERS), await conn.prepare(READ_SAGAS)
    write_batch = await conn.prepare(WRITE_BATCH)
    consumer = AIOKafkaConsumer(bootstrap_servers=cfg["kafka"], group_id=cfg["group"],
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=cfg["kafka"], acks="all",
                                enable_idempotence=True, linger_ms=cfg["linger_ms"],
                                max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    tps = [TopicPartition(cfg["topics"]["in"], p) for p in range(cfg["partitions"])]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    out_cmd, out_rep = cfg["topics"]["cmd"], cfg["topics"]["rep"]
    await producer.partitions_for(out_cmd)
    await producer.partitions_for(out_rep)
    access_key, transfer_key = cfg["access_secret"].encode(), cfg["transfer_secret"].encode()
    pepper = cfg["pepper"].encode()
    cache: dict[str, tuple[str, int]] = {}
    cpu = dict.fromkeys(PHASES, 0.0)
    clock = time.process_time
    print("READY", backend, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start_cpu, start_wall = clock(), time.perf_counter()
    done, batches, limit, size = 0, 0, cfg["records"], cfg["batch"]
    while done < limit:
        t = clock()
        fetched = await consumer.getmany(timeout_ms=5, max_records=min(size, limit - done))
        records = [r for part in fetched.values() for r in part]
        t1 = clock()
        cpu["consume"] += t1 - t
        if not records:
            continue
        items = []
        for rec in records:
            envelope = CommandEnvelope.model_validate(orjson.loads(rec.value))
            items.append((envelope, TransferConfirmPayload.model_validate(envelope.payload)))
        t2 = clock()
        now = int(time.time())
        for envelope, _ in items:  # access tokens: a verified-token cache (by the whole string)
            hit = cache.get(envelope.access_token)
            if hit is None or hit[1] <= now:
                claims = jwt.decode(envelope.access_token, access_key, algorithms=["HS256"],
                                    audience="bizcenter", issuer="user-center",
                                    options={"require": ["exp", "iat", "sub"]})
                hit = cache[envelope.access_token] = (claims["sub"], claims["exp"])
            if hit[0] != envelope.operator_id:
                raise SystemExit("operator mismatch")
        t3 = clock()
        tokens = [jwt.decode(p.transfer_token, transfer_key, algorithms=["HS256"],
                             audience="bizcenter-transfer", issuer="bizcenter",
                             options={"require": ["exp", "jti", "tid"]}) for _, p in items]
        t4 = clock()
        cpu["jwt_access"] += t3 - t2
        cpu["jwt_transfer"] += t4 - t3
        cpu["decode"] += t2 - t1
        decide = 0.0
        async with conn.transaction():
            payers = sorted({tok["sub"] for tok in tokens})
            users = {u["user_id"]: u for u in await lock_users.fetch(payers)}
            existing = {s["transfer_id"]: s["state"]
                        for s in await read_sagas.fetch([tok["tid"] for tok in tokens])}
            d0 = clock()
            cols: list[list[Any]] = [[] for _ in range(9)]
            reserved: dict[str, int] = {}
            commands, replies = [], []
            for (envelope, payload), tok in zip(items, tokens, strict=True):
                tid, payer, amount = tok["tid"], tok["sub"], tok["amt"]
                user = users[payer]
                if tid in existing:
                    body = {"requestId": envelope.request_id, "status": "duplicate",
                            "transferId": tid}
                elif not hmac.compare_digest(_pin_hash(pepper, payload.pin), user["pin_hash"]):
                    body = {"requestId": envelope.request_id, "status": "error",
                            "code": "PIN_MISMATCH"}
                elif user["reserved"] + reserved.get(payer, 0) + amount > user["daily_limit"]:
                    body = {"requestId": envelope.request_id, "status": "error",
                            "code": "DAILY_LIMIT"}
                else:
                    existing[tid] = "IN_PROGRESS"
                    reserved[payer] = reserved.get(payer, 0) + amount
                    state = orjson.dumps({"transferId": tid, "state": "DEBITING", "payer": payer,
                                          "payee": tok["to"], "from": tok["from"],
                                          "amountMinor": amount, "requestId":
                                          envelope.request_id}).decode()
                    for col, value in zip(cols[:6], (tid, envelope.idempotency_key, payer, amount,
                                                     state, tok["jti"]), strict=True):
                        col.append(value)
                    commands.append((tok["from"].encode(), AccountCommand(
                        command_id=f"{tid}:debit", type=AccountCommandType.DEBIT,
                        account_id=tok["from"], amount_minor=amount, currency=tok["cur"],
                        transfer_id=tid, origin="transfer"
                    ).model_dump_json(by_alias=True).encode()))
                    body = {"requestId": envelope.request_id, "status": "pending",
                            "code": "IN_PROGRESS", "transferId": tid}
                raw = orjson.dumps(body)
                cols[6].append(envelope.operator_id)
                cols[7].append(envelope.request_id)
                cols[8].append(raw.decode())
                replies.append((envelope.request_id.encode(), raw))
            decide = clock() - d0
            await write_batch.fetchval(*cols[:9], list(reserved), list(reserved.values()))
        t5 = clock()
        cpu["decide"] += decide
        cpu["pg"] += t5 - t4 - decide
        futures = [await producer.send(out_cmd, value, key=key) for key, value in commands]
        futures += [await producer.send(out_rep, value, key=key) for key, value in replies]
        t6 = clock()
        await asyncio.gather(*futures)
        t7 = clock()
        await consumer.commit()
        cpu["produce"] += t6 - t5
        cpu["flush"] += t7 - t6
        cpu["commit"] += clock() - t7
        done += len(records)
        batches += 1
    print(json.dumps({"records": done, "batches": batches, "cpu": clock() - start_cpu,
                      "wall": time.perf_counter() - start_wall, "phases": cpu}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await producer.stop()
    await consumer.stop()
    await conn.close()


# --------------------------------------------------------------------------- the bench (parent)


async def setup(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=run["kafka"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, args.partitions, 1)
                                   for t in run["topics"].values()])
    finally:
        await admin.close()
    conn = await asyncpg.connect(run["dsn"])
    try:
        await conn.execute(f'CREATE SCHEMA "{run["schema"]}"; SET search_path = "{run["schema"]}";'
                           + DDL)
        pepper = run["pepper"].encode()
        await conn.executemany(
            "INSERT INTO users VALUES ($1, $2, $3, 0, $4, 0)",
            [(f"user-{u}", f"acct-{u}", _pin_hash(pepper, f"{1000 + u}"), 10**15)
             for u in range(args.users)])
    finally:
        await conn.close()
    now = int(time.time())
    access = [jwt.encode({"iss": "user-center", "aud": "bizcenter", "sub": f"user-{u}",
                          "iat": now, "exp": now + 7200, "scope": "wallet:transfer"},
                         run["access_secret"],
                         headers={"kid": "uc-2026-11"}) for u in range(args.users)]
    rng, sent_at = random.Random(13), datetime.now(UTC).isoformat()
    producer = AIOKafkaProducer(bootstrap_servers=run["kafka"], acks="all",
                                enable_idempotence=True, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    values = []
    for i in range(args.records):
        payer, payee = rng.sample(range(args.users), 2)
        tid = uuid.uuid4().hex
        token = jwt.encode({"iss": "bizcenter", "aud": "bizcenter-transfer", "sub": f"user-{payer}",
                            "jti": tid[:16], "tid": tid, "amt": rng.randint(100, 100_000),
                            "cur": "USD", "from": f"acct-{payer}", "to": f"acct-{payee}",
                            "iat": now, "exp": now + 7200}, run["transfer_secret"],
                           headers={"typ": "transfer+jwt"})
        key = f"idem-{payer}-{i}"
        values.append((key.encode(), orjson.dumps({
            "type": "transferConfirm", "requestId": uuid.uuid4().hex, "idempotencyKey": key,
            "operatorId": f"user-{payer}", "accessToken": access[payer], "sentAt": sent_at,
            "payload": {"transferToken": token, "pin": f"{1000 + payer}"}})))
    before = snapshot(None)
    cpu0 = time.process_time()
    futures = [await producer.send(run["topics"]["in"], v, key=k) for k, v in values]
    await asyncio.gather(*futures)
    await producer.stop()
    d, n = delta(before, snapshot(None)), args.records
    return {"bytes": sum(len(v) for _, v in values) / n,
            "client_us": (time.process_time() - cpu0) / n * 1e6, "broker_us": d["kafka"] / n * 1e6}


def snapshot(backend: int | None) -> dict[str, Any]:
    def cpu(pid: int | None) -> float:
        seconds = process_cpu_seconds(pid) if pid is not None else None
        return sum(seconds) if seconds else 0.0
    postmaster = postmaster_pid()
    pg = [postmaster, *children_of(postmaster)] if postmaster is not None else []
    return {"kafka": cpu(kafka_pid()), "pg": {pid: cpu(pid) for pid in pg},
            "backend": cpu(backend), "machine": machine_cpu()[0], "wall": time.perf_counter()}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds between two snapshots; PostgreSQL: processes alive at the end (others'
    backends that exited in between are lost, new ones counted whole)."""
    pg = sum(v - before["pg"].get(pid, 0.0) for pid, v in after["pg"].items())
    return {"pg": pg, **{k: after[k] - before[k] for k in ("kafka", "backend", "machine", "wall")}}


def run_engine(run: dict[str, Any], batch: int, rep: int, n: int, linger: int) -> dict[str, Any]:
    async def reset() -> None:
        conn = await asyncpg.connect(run["dsn"])
        await conn.execute(f'SET search_path = "{run["schema"]}"; TRUNCATE {TABLES};'  # noqa: S608
                           " UPDATE users SET reserved = 0, pin_failures = 0;" + SEED)
        await conn.close()
    asyncio.run(reset())
    cfg = {**run, "batch": batch, "records": n, "linger_ms": linger,
           "group": f"{run['schema']}-b{batch}-r{rep}"}
    child = subprocess.Popen([sys.executable, "-m", "bench.spike_batch_engine", "--child",
                              json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    assert child.stdin is not None and child.stdout is not None
    ready = child.stdout.readline().split()
    if not ready or ready[0] != "READY":
        child.kill()
        raise SystemExit(f"engine failed to start: {ready}")
    backend = int(ready[1])
    before = snapshot(backend)
    child.stdin.write("go\n")
    child.stdin.flush()
    result = json.loads(child.stdout.readline())
    d = delta(before, snapshot(backend))
    child.stdin.write("bye\n")
    child.stdin.flush()
    child.wait()
    done = result["records"]
    per = {k: d[k] / done * 1e6 for k in ("kafka", "pg", "backend")}
    others = d["machine"] - result["cpu"] - d["kafka"] - d["pg"]
    return {"batch": batch, "rep": rep, "records": done, "rate": done / result["wall"],
            "engine_us": result["cpu"] / done * 1e6, "broker_us": per["kafka"],
            "pg_us": per["pg"], "backend_us": per["backend"],
            "others_cores": others / d["wall"],
            "phases": {k: v / done * 1e6 for k, v in result["phases"].items()},
            "fill": done / result["batches"]}


def extrapolate(row: dict[str, Any]) -> list[str]:
    """One transfer, from the figures of one run (stated assumptions, printed)."""
    ph = row["phases"]
    produce = (ph["produce"] + ph["flush"]) / 2  # two outputs per input record
    broker = row["broker_us"] * 2 / 3  # the run: 2 produces + 1 fetch (+ commit) per input
    kafka_record = produce + broker + ph["consume"]
    pg_input = row["pg_us"] + ph["pg"]  # server (all postgres processes) + client, per input
    logic_cmd = ph["decode"] + ph["jwt_access"] + ph["decide"]
    logic = (2 * logic_cmd + 2 * ph["jwt_transfer"] + 2 * (ph["decode"] + ph["decide"])
             + 4 * ph["commit"])
    lines = [
        f"kafka record end to end (produce {produce:.1f} + broker {broker:.1f}"
        f" + consume {ph['consume']:.1f}): "
        f"{kafka_record:.1f} us x 11.5 records = {11.5 * kafka_record:.0f} us",
        f"worker PG (server+client per input) {pg_input:.1f} us x 4 inputs = {4 * pg_input:.0f}",
        f"worker logic: 2 commands x (decode+access jwt+decide {logic_cmd:.1f}) + 1 transfer "
        f"token verify {ph['jwt_transfer']:.1f} (init signs one, ~same) x 2 + 2 account events x "
        f"(decode+decide {ph['decode'] + ph['decide']:.1f}) + commit {ph['commit']:.1f} x 4 = "
        f"{logic:.0f}",
        f"account center (2 commands: decode+decide, PG as the worker's): "
        f"{2 * (ph['decode'] + ph['decide'] + pg_input):.0f}",
    ]
    center = 2 * (ph["decode"] + ph["decide"] + pg_input)
    total = 11.5 * kafka_record + 4 * pg_input + logic + center
    lines.append(f"total ~{total:.0f} us CPU per transfer -> {2e6 / total:,.0f} transfers/s "
                 "on 2 cores (load generator's logic and wake-ups of idle hops not included)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--batch", default="1,10,100,500")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--linger-ms", type=int, default=0,
                        help="engine producer (the loop batches; flush awaits the linger)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.install()
        asyncio.run(engine(json.loads(args.child)))
        return
    kafka, dsn = _env()
    tag = secrets.token_hex(4)
    run = {"kafka": kafka, "dsn": dsn, "schema": f"spike_{tag}", "partitions": args.partitions,
           "topics": {name: f"spike-{tag}.{name}" for name in ("in", "cmd", "rep")},
           "access_secret": secrets.token_hex(32), "transfer_secret": secrets.token_hex(32),
           "pepper": secrets.token_hex(16)}
    rows = []
    try:
        uvloop.install()
        pre = asyncio.run(setup(args, run))
        print(f"pre-produce: {args.records} records of {pre['bytes']:.0f} B: client "
              f"{pre['client_us']:.1f} us/record, broker {pre['broker_us']:.1f} us/record")
        print("batch rep records  rec/s  engine broker pg(all) pg(ours) others fill | "
              + " ".join(p[:8] for p in PHASES) + "  (CPU us per input record)")
        for batch in (int(b) for b in args.batch.split(",")):
            for rep in range(1, args.runs + 1):
                n = min(args.records, max(3000, 400 * batch))
                row = run_engine(run, batch, rep, n, args.linger_ms)
                rows.append(row)
                print(f"{batch:5} {rep:3} {row['records']:7} {row['rate']:6.0f} "
                      f"{row['engine_us']:6.1f} {row['broker_us']:6.1f} {row['pg_us']:7.1f} "
                      f"{row['backend_us']:8.1f} {row['others_cores']:6.2f} {row['fill']:4.0f} | "
                      + " ".join(f"{row['phases'][p]:8.1f}" for p in PHASES), flush=True)
        best = min((r for r in rows if r["batch"] == max(x["batch"] for x in rows)),
                   key=lambda r: r["engine_us"] + r["broker_us"] + r["pg_us"])
        print(f"extrapolation from batch {best['batch']} run {best['rep']}:")
        for line in extrapolate(best):
            print("  " + line)
    finally:
        asyncio.run(cleanup(run))


async def cleanup(run: dict[str, Any]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=run["kafka"])
    await admin.start()
    try:
        await admin.delete_topics(list(run["topics"].values()))
    finally:
        await admin.close()
    conn = await asyncpg.connect(run["dsn"])
    await conn.execute(f'DROP SCHEMA IF EXISTS "{run["schema"]}" CASCADE')
    await conn.close()


if __name__ == "__main__":
    main()
