"""The ledger stream's cap is the configured one everywhere an entry is added, the
period-reset entry included: QUOTAGATE_LEDGER_MAXLEN=0 drops nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import ms
from quotagate import catalog
from quotagate.clock import ManualClock
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.ledger.store import Ledger, LedgerOptions
from quotagate.sync.sink import entry_fields

M = "message_tokens"
BACKLOG = 300  # entries SQL has not got yet: three of the stream's 100-entry nodes


@pytest.fixture
async def make(redis: Any, clock: ManualClock) -> AsyncIterator[Any]:
    made: list[Ledger] = []

    async def ledger_with(maxlen: int) -> Ledger:
        led = Ledger(redis, catalog.load(None).catalog, clock, Keys(64),
                     LedgerOptions(ledger_maxlen=maxlen))
        made.append(led)
        return led

    yield ledger_with
    for led in made:
        await led.aclose()


async def backlog(ledger: Ledger, redis: Any, org: str) -> str:
    stream = ledger.keys.ledger(ledger.keys.shard_of(org))
    for i in range(BACKLOG):
        await redis.xadd(stream, {"type": "config", "op": "filler", "org": org, "n": str(i)})
    return stream


async def resets(redis: Any, stream: str) -> int:
    return sum(1 for _, f in await redis.xrange(stream)
               if entry_fields(f)["type"] == "period_reset")


async def test_maxlen_0_keeps_every_entry_across_period_resets(
        make: Any, redis: Any, clock: ManualClock) -> None:
    ledger = await make(0)
    await ledger.upsert_plan("k", [Allowance(M, 1_000)])
    await ledger.upsert_org("z", "k")
    stream = await backlog(ledger, redis, "z")
    n = await redis.xlen(stream)
    clock.set(ms(2026, 12, 1))
    await ledger.check(Subject("z"))  # Reserve's script: only the period-reset entry
    clock.set(ms(2027, 1, 1))
    await ledger.topup("z", M, 5, "buy")  # an admin script's
    clock.set(ms(2027, 2, 1))
    await ledger.get_balance(Subject("z"), [M])  # GetBalance's
    clock.set(ms(2027, 3, 1))
    r = await ledger.reserve(Subject("z"), [Charge(M, 1)], idempotency_key="k")
    await ledger.commit(r.reservation_id)
    assert await resets(redis, stream) == 4
    # 4 resets, the top-up, the reserve and the commit: nothing trimmed
    assert await redis.xlen(stream) == n + 7
    first = (await redis.xrange(stream, count=1))[0][1]
    assert (first[b"type"], first[b"op"]) == (b"config", b"org")  # upsert_org's, still first


async def test_the_period_reset_entry_trims_to_the_configured_cap(
        make: Any, redis: Any, clock: ManualClock) -> None:
    ledger = await make(50)
    await ledger.upsert_plan("k", [Allowance(M, 1_000)])
    await ledger.upsert_org("y", "k")
    stream = await backlog(ledger, redis, "y")
    assert await redis.xlen(stream) > BACKLOG
    clock.set(ms(2026, 12, 1))
    await ledger.check(Subject("y"))  # its only entry: the period reset's
    assert await resets(redis, stream) == 1
    # approximate trimming drops whole nodes: down to about 50, not the 1,000,000 of old
    assert await redis.xlen(stream) <= 200
