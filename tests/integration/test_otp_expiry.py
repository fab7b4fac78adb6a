"""An OTP never verified in time fails the transfer, with no money moved (short TTL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from system import System

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("otp"), otp_ttl_seconds=2.0)
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def test_unverified_otp_expires_and_no_money_moves(system: System) -> None:
    await system.add_user("payer", balance=100_000, threshold=1_000)
    await system.add_user("payee", balance=0)
    init = await system.init("payer", "acc-payee", 50_000)
    idem = str(uuid.uuid4())
    pending = await system.confirm("payer", init["data"]["transferToken"], idem=idem)
    assert pending["code"] == "OTP_REQUIRED"
    otp = await system.otp_for(pending["data"]["transferId"])
    # Nobody answers: the saga's deadline fails it and tells the confirm's requester.
    assert system.client is not None
    expired = await system.client.next_reply(pending["requestId"], after=1, timeout=30)
    assert (expired["status"], expired["code"]) == ("error", "OTP_EXPIRED")
    assert expired["data"]["state"] == "FAILED"
    # The right OTP, too late: the saved outcome.
    late = await system.call("verifyOtp", "payer", {"otp": otp}, idem=idem)
    assert late["code"] == "OTP_EXPIRED"
    assert await system.balances("acc-payer", "acc-payee") == {"acc-payer": 100_000,
                                                                "acc-payee": 0}
    assert system.store is not None
    from datetime import UTC, datetime
    assert await system.store.reserved_today("payer", datetime.now(UTC).date()) == 0
