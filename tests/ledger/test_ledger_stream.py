"""The ledger stream cap (QUOTAGATE_LEDGER_MAXLEN): while SQL is away the entries wait in
their shard's stream; the cap bounds Redis memory, 0 keeps every entry."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from quotagate.clock import ManualClock
from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import entry_fields

M = "message_tokens"


async def spend(led: Ledger, n: int) -> None:
    for i in range(n):
        r = await led.reserve(Subject("o"), [Charge(M, 10)], idempotency_key=f"k{i}")
        assert r.decision is Decision.GRANTED
        await led.commit(r.reservation_id, [Charge(M, 7)])


@pytest.mark.parametrize("maxlen", [0, 100])
async def test_cap_of_the_unsynced_ledger_entries(
        redis: Any, ledger: Ledger, clock: ManualClock, maxlen: int) -> None:
    led = Ledger(redis, ledger.catalog, clock, ledger.keys,
                 dataclasses.replace(ledger.opt, ledger_maxlen=maxlen))
    try:
        await led.upsert_org("o", "pro")
        stream = led.keys.ledger(led.keys.shard_of("o"))
        before = await redis.xlen(stream)
        ((oldest, _),) = await redis.xrange(stream, count=1)
        await spend(led, 300)
        n = await redis.xlen(stream)
        if maxlen == 0:
            # nothing trimmed: a reserve and a commit entry per charge, all still there
            assert n == before + 600
            entries = await redis.xrange(stream)
            assert entries[0][0] == oldest
            assert sum(1 for _, f in entries if entry_fields(f)["type"] == "commit") == 300
        else:
            # trimmed in whole stream nodes (MAXLEN ~): bounded near the cap, oldest gone
            assert maxlen <= n < 600
            ((first, _),) = await redis.xrange(stream, count=1)
            assert first != oldest
        # the balance is exact either way: the cap only bounds history awaiting SQL
        (b,) = await led.get_balance(Subject("o"), [M])
        assert b.used == 300 * 7 and b.reserved == 0
    finally:
        await led.aclose()
