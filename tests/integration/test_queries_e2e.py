"""Queries end to end: two worker processes (each with its web server), the account
center and the funding provider, the real broker and PostgreSQL. Over Kafka
(business.commands → business.queries → business.replies) and over HTTP.

Over 400 lines: every test shares one two-worker cluster (module fixture, slow to start).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiokafka.partitioner import murmur2
from conftest import wait_for
from system import PIN, System, free_port

from agents.saga_engine import saga_group
from agents.web import SERVED_BY_HEADER
from events.consumer_groups import group_state

pytestmark = pytest.mark.integration

PARTITIONS = 3


class Cluster:
    """The system plus the web ports of its two workers, and the opaque tags by which
    their answers name them (``X-Bizcenter-Served-By``, random per process, never an
    address). Every query (balance, history, details) is answered from PostgreSQL by the
    worker it reaches: over HTTP the one the request arrives at, on Kafka the one consuming
    its partition of ``business.queries``."""

    def __init__(self, system: System, ports: tuple[int, int]) -> None:
        self.system = system
        self.ports = ports
        self.tags: tuple[str, ...] = ()  # learnt from the workers' answers (ready())

    async def tag_of(self, port: int) -> str | None:
        """The tag a worker puts on its answers (an unauthenticated request's 401 will do);
        None while it does not listen."""
        try:
            status, _body, headers = await self.system.http_get(port, "/transactions/x")
        except OSError:  # not listening yet (aiohttp's errors are OSErrors)
            return None
        return headers.get(SERVED_BY_HEADER) if status == 401 else None

    async def ready(self) -> bool:
        """Both workers serve HTTP under two tags, and both of the workers' consumer groups
        are stable with both workers in them (so each worker holds partitions of each)."""
        tags = [await self.tag_of(port) for port in self.ports]
        if None in tags or len(set(tags)) != len(tags):
            return False
        self.tags = tuple(t for t in tags if t is not None)
        bootstrap = self.system.settings.kafka_bootstrap_servers
        groups = (self.system.settings.app_id, saga_group(self.system.settings))
        return all([await group_state(bootstrap, g) == ("Stable", 2) for g in groups])


def partition_of(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster(kafka_bootstrap: str, database_url: str, isolation_id: str,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    ports = (free_port(), free_port())
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("queries"), topic_partitions=PARTITIONS,
                        web_enabled=True, web_port=ports[0])
    await sys_.start()
    sys_.start_worker("worker-2", web_port=ports[1])
    cluster = Cluster(sys_, ports)
    try:
        await wait_for(cluster.ready, timeout=120, interval=0.5,
                       what="both workers in both groups, serving HTTP")
        yield cluster
    finally:
        await sys_.close()


@pytest.fixture
def system(cluster: Cluster) -> System:
    return cluster.system


def _user() -> str:
    return "u" + uuid.uuid4().hex[:8]


async def _pair(system: System, payer_balance: int = 100_000) -> tuple[str, str]:
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=payer_balance)
    await system.add_user(payee, balance=0)
    return payer, payee


async def _balance(system: System, user: str, **kw: Any) -> dict[str, Any]:
    reply = await system.call("queryBalance", user, {}, **kw)
    return reply


async def _account_event(system: System, account: str, n: int, balance: int,
                         at: datetime, *, kind: str = "credited", amount: int = 1) -> None:
    """An account event as the account center would publish it (a command of some other
    service: its id is not one of the saga's)."""
    await system.produce("account.events", account.encode(), {
        "commandId": f"ext-{account}-{n}", "type": kind, "accountId": account,
        "amountMinor": amount, "balanceAfterMinor": balance,
        "occurredAt": at.isoformat().replace("+00:00", "Z")})


# --------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------


async def test_balance_after_transfers_and_a_top_up(system: System) -> None:
    payer, payee = await _pair(system)
    assert (await system.transfer(payer, f"acc-{payee}", 12_345))["status"] == "ok"
    assert (await system.transfer(payee, f"acc-{payer}", 345))["status"] == "ok"
    await system.add_funding_source(payee, f"card-{payee}")
    topup = await system.call("topUp", payee, {"fundingSourceId": f"card-{payee}",
                                               "amountMinor": 5_000, "currency": "USD",
                                               "pin": PIN},
                              idem=str(uuid.uuid4()))
    assert topup["status"] == "ok", topup
    expected = {f"acc-{payer}": 88_000, f"acc-{payee}": 17_000}
    assert await system.balances(*expected) == expected  # the ledger agrees
    for user in (payer, payee):
        reply = await _balance(system, user)
        assert reply["status"] == "ok" and reply["type"] == "queryBalance", reply
        data = reply["data"]
        assert data["balanceMinor"] == expected[f"acc-{user}"]
        assert (data["accountId"], data["currency"]) == (f"acc-{user}", "USD")
        assert datetime.fromisoformat(data["asOf"]) <= datetime.now(UTC)
    history = await system.call("queryTransactionHistory", payee, {"limit": 10})
    assert [(i["kind"], i["amountMinor"], i["balanceAfterMinor"])
            for i in history["data"]["items"]] == [
        ("credit", 5_000, 17_000), ("debit", -345, 12_000), ("credit", 12_345, 12_345)]
    assert history["data"]["items"][0]["transferId"] == topup["data"]["transferId"]
    assert "nextCursor" not in history["data"]


async def test_a_query_is_answered_afresh_for_the_same_request_id(system: System) -> None:
    payer, payee = await _pair(system)
    request_id = str(uuid.uuid4())
    assert system.client is not None
    token = system.token(payer)
    first = await system.call("queryBalance", payer, {}, token=token)
    env = system.client.envelope("queryBalance", payer, token, {}, request_id=request_id)
    await system.client.send(env)
    before = await system.final(request_id)
    # No movement yet: the opening balance, announced on account.events when opened.
    assert before["data"]["balanceMinor"] == first["data"]["balanceMinor"] == 100_000
    assert (await system.transfer(payer, f"acc-{payee}", 700))["status"] == "ok"
    await system.client.send(env)  # the same request again: not a saved reply
    after = await system.client.wait(
        lambda _: len(system.client.replies[request_id]) == 2  # type: ignore[union-attr]
        and system.client.replies[request_id][1], 30)  # type: ignore[union-attr]
    assert after["data"]["balanceMinor"] == 99_300, system.client.replies[request_id]


async def test_another_users_balance_is_forbidden(system: System) -> None:
    alice, bob = await _pair(system)
    # On Kafka a query is always about the operator's own account; acting as bob with
    # alice's token is refused like any other command.
    reply = await _balance(system, bob, token=system.token(alice))
    assert (reply["status"], reply["code"]) == ("error", "FORBIDDEN")
    # Over HTTP the account is in the path.
    cluster_port = system.settings.web_port
    status, body, _ = await system.http_get(cluster_port, f"/accounts/acc-{bob}/balance",
                                            system.token(alice))
    assert (status, body["code"]) == (403, "FORBIDDEN")


async def test_details_of_someone_elses_transfer_look_like_an_unknown_id(
        system: System) -> None:
    payer, payee = await _pair(system)
    stranger = _user()
    await system.add_user(stranger, balance=0)
    done = await system.transfer(payer, f"acc-{payee}", 1_500)
    transfer_id = done["data"]["transferId"]
    for user in (payer, payee):
        reply = await system.call("queryTransactionDetails", user, {"transferId": transfer_id})
        assert reply["status"] == "ok", reply
        data = reply["data"]
        assert {k: data[k] for k in ("transferId", "fromAccountId", "toAccountId",
                                     "amountMinor", "currency", "state")} == {
            "transferId": transfer_id, "fromAccountId": f"acc-{payer}",
            "toAccountId": f"acc-{payee}", "amountMinor": 1_500, "currency": "USD",
            "state": "COMPLETED"}
        assert data["createdAt"] <= data["updatedAt"] and "code" not in data
    others = await system.call("queryTransactionDetails", stranger,
                               {"transferId": transfer_id})
    unknown = await system.call("queryTransactionDetails", stranger,
                                {"transferId": str(uuid.uuid4())})

    def comparable(reply: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reply.items() if k != "requestId"}

    assert comparable(others) == comparable(unknown)
    assert (others["status"], others["code"]) == ("error", "FORBIDDEN")
    # The same over HTTP: same status, same body.
    port = system.settings.web_port
    token = system.token(stranger)
    assert (await system.http_get(port, f"/transactions/{transfer_id}", token))[:2] == \
        (await system.http_get(port, f"/transactions/{uuid.uuid4()}", token))[:2]


async def test_failed_transfer_details_carry_the_code(system: System) -> None:
    payer, payee = await _pair(system, payer_balance=100)
    reply = await system.transfer(payer, f"acc-{payee}", 5_000)
    assert reply["code"] == "INSUFFICIENT_FUNDS"
    details = await system.call("queryTransactionDetails", payer,
                                {"transferId": reply["data"]["transferId"]})
    assert (details["data"]["state"], details["data"]["code"]) == (
        "FAILED", "INSUFFICIENT_FUNDS")
    # A rejected debit moved no money and is not in the history: only the opening is.
    history = await system.call("queryTransactionHistory", payer, {})
    assert [(i["transferId"], i["kind"], i["amountMinor"])
            for i in history["data"]["items"]] == [(f"open:acc-{payer}", "credit", 100)]


async def test_history_of_over_a_thousand_entries_pages_to_the_end(system: System) -> None:
    user = _user()
    await system.add_user(user, balance=0, open_account=False)
    account = f"acc-{user}"
    start = datetime(2030, 1, 1, tzinfo=UTC)
    total = 1_037
    await asyncio.gather(*(
        _account_event(system, account, n, n, start + timedelta(seconds=n))
        for n in range(1, total + 1)))
    await wait_for(
        lambda: _has_balance(system, user, total), timeout=60, interval=0.2,
        what="the last account event applied")
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        payload: dict[str, Any] = {"limit": 100}
        if cursor is not None:
            payload["cursor"] = cursor
        reply = await system.call("queryTransactionHistory", user, payload)
        assert reply["status"] == "ok", reply
        seen += [item["balanceAfterMinor"] for item in reply["data"]["items"]]
        pages += 1
        cursor = reply["data"].get("nextCursor")
        if cursor is None:
            break
    assert pages == 11
    assert seen == list(range(total, 0, -1))  # newest first, no gap, no repeat
    # A window: from inclusive, to exclusive.
    window = await system.call("queryTransactionHistory", user, {
        "limit": 100, "from": "2030-01-01T00:10:00Z", "to": "2030-01-01T00:11:00Z"})
    assert [i["balanceAfterMinor"] for i in window["data"]["items"]] == list(
        range(659, 599, -1))
    # The same pages over HTTP, from either worker.
    token = system.token(user)
    http_seen: list[int] = []
    path = f"/accounts/{account}/transactions?limit=100"
    while True:
        status, body, _ = await system.http_get(system.settings.web_port, path, token)
        assert status == 200, body
        http_seen += [item["balanceAfterMinor"] for item in body["items"]]
        if "nextCursor" not in body:
            break
        path = f"/accounts/{account}/transactions?limit=100&cursor={body['nextCursor']}"
    assert http_seen == seen


async def _has_balance(system: System, user: str, balance: int) -> bool:
    reply = await _balance(system, user)
    return bool(reply["status"] == "ok" and reply["data"]["balanceMinor"] == balance)


async def test_invalid_history_requests(system: System) -> None:
    user = _user()
    await system.add_user(user, balance=0)
    for payload in ({"limit": 101}, {"limit": 0}, {"cursor": "x"}, {"cursor": "5"},
                    {"from": "2030-01-01T00:00:00"}):
        reply = await system.call("queryTransactionHistory", user, payload)
        assert (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST"), payload


# --------------------------------------------------------------------------------------
# read your writes
# --------------------------------------------------------------------------------------


async def test_a_balance_read_right_after_completed_shows_it(cluster: Cluster) -> None:
    """Right after each final reply, on Kafka and over HTTP through either worker, with no
    retry: the balances and the transfer's details are committed with the saga."""
    system = cluster.system
    payer, payee = await _pair(system, payer_balance=1_000_000)
    for n in range(1, 31):
        done = await system.transfer(payer, f"acc-{payee}", 100)
        assert done["status"] == "ok", done
        transfer_id = done["data"]["transferId"]
        payer_view, payee_view, details = await asyncio.gather(
            _balance(system, payer), _balance(system, payee),
            system.call("queryTransactionDetails", payee, {"transferId": transfer_id}))
        assert payer_view["data"]["balanceMinor"] == 1_000_000 - 100 * n
        assert payee_view["data"]["balanceMinor"] == 100 * n
        assert details["data"]["state"] == "COMPLETED", details
        port = cluster.ports[n % 2]  # and over HTTP, through each worker in turn
        status, body, _ = await system.http_get(port, f"/transactions/{transfer_id}",
                                                system.token(payer))
        assert (status, body.get("state")) == (200, "COMPLETED"), (port, body)
        if n % 5 == 0:
            status, body, _ = await system.http_get(
                port, f"/accounts/acc-{payer}/balance", system.token(payer))
            assert (status, body["balanceMinor"]) == (200, 1_000_000 - 100 * n)
    history = await system.call("queryTransactionHistory", payee, {"limit": 100})
    assert len(history["data"]["items"]) == 30


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------


async def test_http_with_a_good_an_expired_and_another_users_token(cluster: Cluster) -> None:
    system = cluster.system
    payer, payee = await _pair(system)
    done = await system.transfer(payer, f"acc-{payee}", 2_000)
    transfer_id = done["data"]["transferId"]
    good, expired = system.token(payer), system.token(payer, ttl_seconds=-120)
    other = system.token(payee)
    paths = {
        "balance": f"/accounts/acc-{payer}/balance",
        "history": f"/accounts/acc-{payer}/transactions?limit=5",
        "details": f"/transactions/{transfer_id}",
    }
    for port in cluster.ports:
        status, body, _ = await system.http_get(port, paths["balance"], good)
        assert status == 200 and body == {
            "accountId": f"acc-{payer}", "currency": "USD", "balanceMinor": 98_000,
            "asOf": body["asOf"]}, body
        status, body, _ = await system.http_get(port, paths["history"], good)
        assert status == 200 and [i["amountMinor"] for i in body["items"]] == [-2_000,
                                                                               100_000]
        assert body["items"][0]["transferId"] == transfer_id
        status, body, _ = await system.http_get(port, paths["details"], good)
        assert status == 200 and body["state"] == "COMPLETED"
        assert (body["fromAccountId"], body["toAccountId"]) == (f"acc-{payer}",
                                                                f"acc-{payee}")
        for path in paths.values():
            for token, expected in ((expired, (401, "UNAUTHENTICATED")),
                                    (None, (401, "UNAUTHENTICATED")),
                                    ("not-a-jwt", (401, "UNAUTHENTICATED"))):
                status, body, _ = await system.http_get(port, path, token)
                assert (status, body["code"]) == expected, (path, body)
                assert set(body) == {"code", "message"}
        # Another user's token: someone else's account and transfer.
        stranger = _user()
        await system.add_user(stranger, balance=0)
        for path in (paths["balance"], paths["history"], paths["details"]):
            status, body, _ = await system.http_get(port, path, system.token(stranger))
            assert (status, body["code"]) == (403, "FORBIDDEN"), (path, body)
        # The payee sees the details but not the payer's account.
        assert (await system.http_get(port, paths["details"], other))[0] == 200
        assert (await system.http_get(port, paths["balance"], other))[0] == 403


async def test_http_bad_parameters_are_400(cluster: Cluster) -> None:
    system = cluster.system
    user = _user()
    await system.add_user(user, balance=0)
    token = system.token(user)
    for query in ("limit=abc", "limit=0", "limit=101", "cursor=next", "cursor=7",
                  "from=yesterday", "from=2030-01-01T00:00:00"):
        status, body, _ = await system.http_get(
            cluster.ports[0], f"/accounts/acc-{user}/transactions?{query}", token)
        assert (status, body["code"]) == (400, "INVALID_REQUEST"), (query, body)


async def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
    """GET with exactly these headers (a forged forward, for instance)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", headers=headers,
            timeout=aiohttp.ClientTimeout(total=30)) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


def _keys_per_partition(prefix: str) -> list[str]:
    """One key of each partition: ``prefix`` and a number."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < PARTITIONS:
        found.setdefault(partition_of(f"{prefix}{n}"), f"{prefix}{n}")
        n += 1
    return [found[p] for p in range(PARTITIONS)]


def _no_address_in(headers: dict[str, str], cluster: Cluster) -> None:
    for name, value in headers.items():
        for revealing in ("127.0.0.1", "http://", *(f":{p}" for p in cluster.ports)):
            assert revealing not in value, (name, value)


async def test_an_unauthenticated_request_is_refused_where_it_arrives(
        cluster: Cluster) -> None:
    """Each worker answers 401 itself (its own tag in X-Bizcenter-Served-By, no address in
    any header), for keys of every partition, on every view."""
    system = cluster.system
    user = _user()
    await system.add_user(user, balance=0, open_account=False)
    expired = system.token(user, ttl_seconds=-120)
    for port, tag in zip(cluster.ports, cluster.tags, strict=True):
        for key in _keys_per_partition("probe-"):
            for path in (f"/transactions/{key}", f"/accounts/{key}/balance",
                         f"/accounts/{key}/transactions"):
                for token in (None, "not-a-jwt", expired):
                    status, body, headers = await system.http_get(port, path, token)
                    assert (status, body["code"]) == (401, "UNAUTHENTICATED"), (port, path)
                    assert headers[SERVED_BY_HEADER] == tag, (port, path, token)
                    _no_address_in(headers, cluster)


def _old_forward_headers(cluster: Cluster, path: str, operator: str) -> dict[str, str]:
    """The headers with which a worker of an earlier version vouched for an operator it had
    authenticated (no bearer token), signed as it signed them: HMAC-SHA256 under the
    group's forward secret (a setting these workers no longer have) over the group, the
    request, the operator and the time."""
    secret = "a-forward-secret-of-an-earlier-version-" + "s" * 32
    operator_b64 = base64.urlsafe_b64encode(operator.encode()).decode()
    at = str(int(time.time()))
    message = "\n".join(("bizcenter-forward-v1", cluster.system.settings.app_id, "GET",
                         path, operator_b64, at))
    return {
        "X-Bizcenter-Forwarded-Operator": operator_b64,
        "X-Bizcenter-Forwarded-At": at,
        "X-Bizcenter-Forward-Signature": hmac.new(secret.encode(), message.encode(),
                                                  hashlib.sha256).hexdigest(),
    }


async def test_forward_headers_are_believed_in_no_way(cluster: Cluster) -> None:
    """No worker forwards any more, so no header vouches for anyone: a request carrying the
    forward headers of an earlier version, signed as it signed them, is refused without a
    bearer token (every view, both workers); with one, the token's operator is answered,
    never the header's."""
    system = cluster.system
    payer, payee = await _pair(system)
    stranger = _user()
    await system.add_user(stranger, balance=0)
    done = await system.transfer(payer, f"acc-{payee}", 1_000)
    paths = (f"/accounts/acc-{payer}/balance", f"/accounts/acc-{payer}/transactions",
             f"/transactions/{done['data']['transferId']}")
    for port, tag in zip(cluster.ports, cluster.tags, strict=True):
        for path in paths:
            vouching = _old_forward_headers(cluster, path, payer)
            status, body, headers = await _get(port, path, vouching)
            assert (status, body["code"], headers[SERVED_BY_HEADER]) == (
                401, "UNAUTHENTICATED", tag), (port, path)
            status, body, _ = await _get(port, path, {
                **vouching, "Authorization": f"Bearer {system.token(stranger)}"})
            assert (status, body["code"]) == (403, "FORBIDDEN"), (port, path)
            # The control: the payer's own token, the header vouching for the stranger.
            status, _, _ = await _get(port, path, {
                **_old_forward_headers(cluster, path, stranger),
                "Authorization": f"Bearer {system.token(payer)}"})
            assert status == 200, (port, path)


async def test_faust_raw_endpoints_are_off(cluster: Cluster) -> None:
    for port in cluster.ports:
        for path in ("/table/", "/table/transfers/", "/table/balances/acc-x/", "/router/",
                     "/router/balances/", "/graph/", "/assignment/", "/performance/"):
            status, _body, _ = await cluster.system.http_get(port, path)
            assert status == 404, (port, path)


async def test_every_worker_answers_every_query_itself(cluster: Cluster) -> None:
    """Accounts and transfers of every partition: over HTTP each worker answers balance,
    history and details itself (its own tag), from PostgreSQL, whoever consumes their
    partitions; on Kafka a query is answered wherever its command and its answer land,
    including on two different workers."""
    system = cluster.system
    users: dict[int, str] = {}
    n = 0
    while len(users) < PARTITIONS:  # one account in every partition
        user = f"w{n}{uuid.uuid4().hex[:6]}"
        n += 1
        if partition_of(f"acc-{user}") not in users:
            users[partition_of(f"acc-{user}")] = user
            await system.add_user(user, balance=0, open_account=False)
            await _account_event(system, f"acc-{user}", 1, 1_000 + partition_of(f"acc-{user}"),
                                 datetime.now(UTC))
    for partition, user in users.items():
        await wait_for(lambda u=user, p=partition: _has_balance(system, u, 1_000 + p),
                       timeout=30, what=f"balance of {user}")
    payer, payee = await _pair(system)
    transfers: dict[int, str] = {}
    for _ in range(40):  # and a transfer in every partition (ids are random)
        done = await system.transfer(payer, f"acc-{payee}", 10)
        assert done["status"] == "ok", done
        transfers.setdefault(partition_of(done["data"]["transferId"]),
                             done["data"]["transferId"])
        if len(transfers) == PARTITIONS:
            break
    assert len(transfers) == PARTITIONS
    for port, tag in zip(cluster.ports, cluster.tags, strict=True):
        for partition, user in users.items():
            token = system.token(user)
            status, body, headers = await system.http_get(
                port, f"/accounts/acc-{user}/balance", token)
            assert (status, body["balanceMinor"], headers[SERVED_BY_HEADER]) == (
                200, 1_000 + partition, tag)
            status, body, headers = await system.http_get(
                port, f"/accounts/acc-{user}/transactions", token)
            assert (status, [i["balanceAfterMinor"] for i in body["items"]],
                    headers[SERVED_BY_HEADER]) == (200, [1_000 + partition], tag)
        for transfer_id in transfers.values():
            status, body, headers = await system.http_get(
                port, f"/transactions/{transfer_id}", system.token(payee))
            assert (status, body["state"], headers[SERVED_BY_HEADER]) == (
                200, "COMPLETED", tag), (port, transfer_id)
            _no_address_in(headers, cluster)
    # Kafka: the command's partition is its requestId's (the saga engine's group), the
    # answer's the account's (the Faust group); both groups have both workers, so among
    # every pair of partitions some command and its answer are on different workers.
    assert system.client is not None
    bootstrap = system.settings.kafka_bootstrap_servers
    for group in (system.settings.app_id, saga_group(system.settings)):
        assert await group_state(bootstrap, group) == ("Stable", 2), group
    for partition, user in users.items():
        for request_partition in range(PARTITIONS):
            request_id = next(r for r in (f"rq-{uuid.uuid4()}" for _ in range(1000))
                              if partition_of(r) == request_partition)
            env = system.client.envelope("queryBalance", user, system.token(user), {},
                                         request_id=request_id)
            await system.client.send(env)
            reply = await system.final(request_id)
            assert reply["data"]["balanceMinor"] == 1_000 + partition, reply
    for transfer_id in transfers.values():
        details = await system.call("queryTransactionDetails", payer,
                                    {"transferId": transfer_id})
        assert details["data"]["state"] == "COMPLETED", details


async def test_a_new_worker_answers_from_postgresql_at_once(cluster: Cluster) -> None:
    """Both workers stop; a new worker process (memory store, nothing on disk, nothing to
    rebuild) answers balances, history and details from PostgreSQL (written before the
    stop) with its first answers: over HTTP as soon as it listens, no 503, no retry."""
    system = cluster.system
    users: dict[int, str] = {}
    while len(users) < PARTITIONS:
        user = _user()
        if partition_of(f"acc-{user}") not in users:
            users[partition_of(f"acc-{user}")] = user
            await system.add_user(user, balance=0, open_account=False)
            await _account_event(system, f"acc-{user}", 1, 77, datetime.now(UTC))
    for user in users.values():
        await wait_for(lambda u=user: _has_balance(system, u, 77), timeout=30)
    payer, payee = await _pair(system)
    done = await system.transfer(payer, f"acc-{payee}", 300)
    transfer_id = done["data"]["transferId"]
    await system.stop_process("worker-2")
    await system.stop_process("worker")
    system.start_process("worker")
    port = cluster.ports[0]
    tag = await wait_for(lambda: cluster.tag_of(port), timeout=120, interval=0.2,
                         what="the new worker serving HTTP")
    assert tag not in cluster.tags  # a new process: a new tag
    status, body, _ = await system.http_get(port, f"/transactions/{transfer_id}",
                                            system.token(payee))
    assert (status, body.get("state")) == (200, "COMPLETED"), body
    for user in users.values():
        status, body, _ = await system.http_get(
            port, f"/accounts/acc-{user}/balance", system.token(user))
        assert (status, body["balanceMinor"]) == (200, 77)
    status, body, _ = await system.http_get(port, f"/accounts/acc-{payer}/transactions",
                                            system.token(payer))
    assert (status, [i["amountMinor"] for i in body["items"]]) == (200, [-300, 100_000])
    # And on Kafka, once the new worker has joined the groups.
    for user in users.values():
        reply = await _balance(system, user, timeout=120)
        assert reply["data"]["balanceMinor"] == 77
    details = await system.call("queryTransactionDetails", payee, {"transferId": transfer_id})
    assert details["data"]["state"] == "COMPLETED"
    history = await system.call("queryTransactionHistory", payer, {})
    assert [i["amountMinor"] for i in history["data"]["items"]] == [-300, 100_000]
