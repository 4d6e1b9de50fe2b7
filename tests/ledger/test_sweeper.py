"""The background sweeper: one sweep per interval for a whole fleet of sidecars, each
shard's step one Function call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import CLUSTER
from quotagate.clock import ManualClock
from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def held(led: Ledger) -> int:
    (b,) = await led.get_balance(Subject("o"), [M])
    return b.reserved


async def test_one_sweep_per_interval_for_the_whole_fleet(
        redis: Any, ledger: Ledger, clock: ManualClock) -> None:
    await ledger.upsert_org("o", "pro")
    for i in range(3):
        r = await ledger.reserve(Subject("o"), [Charge(M, 100)], idempotency_key=f"k{i}",
                                 ttl_seconds=10)
        assert r.decision is Decision.GRANTED
    clock.advance(11_000)
    # Another sidecar: its own Ledger (own pipelined connection) on the same Redis.
    other = Ledger(redis, ledger.catalog, clock, ledger.keys)
    try:
        swept = await asyncio.gather(ledger.sweep_due(400, "a"), other.sweep_due(400, "b"))
        # exactly one of them swept, and it released all three holds
        assert sorted(swept, key=lambda x: x is None) == [3, None]
        assert await held(ledger) == 0
        # within the interval nobody sweeps again
        assert await ledger.sweep_due(400, "a") is None
        assert await other.sweep_due(400, "b") is None
        # the lease lapses (its holder may have died): the next tick sweeps again
        await asyncio.sleep(0.5)
        assert await other.sweep_due(400, "b") == 0
    finally:
        await other.aclose()


@pytest.mark.skipif(CLUSTER, reason="counts the commands of a single server")
async def test_each_shard_is_one_function_call(redis: Any, ledger: Ledger) -> None:
    await ledger.sweep_all()  # loads the library
    await redis.config_resetstat()
    assert await ledger.sweep_all() == 0
    stats = await redis.info("commandstats")
    assert stats["cmdstat_fcall"]["calls"] == ledger.keys.shards
    assert "cmdstat_evalsha" not in stats
