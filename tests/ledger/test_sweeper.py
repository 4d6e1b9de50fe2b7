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


@pytest.mark.parametrize("pipeline", [True, False])
async def test_a_sweep_leaves_connections_for_the_spend_path(
        redis_server: Any, ledger: Ledger, pipeline: bool) -> None:
    """A sweep of every shard runs beside the spend path. Where each step takes a pooled
    connection of its own (Redis Cluster, or the pipeline off), a Reserve, a GetBalance
    and a health ping sent during the sweep still get one: here the pool holds 12
    connections (per node) and the ledger has 64 shards."""
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster

    from quotagate.ledger.store import LedgerOptions

    small: Any = (aiocluster.RedisCluster.from_url(redis_server.seed_url, max_connections=12)
                  if CLUSTER else aioredis.Redis.from_url(redis_server.url, max_connections=12))
    led = Ledger(small, ledger.catalog, ledger.clock, ledger.keys,
                 LedgerOptions(pipeline=pipeline))
    try:
        if CLUSTER:
            # before any concurrent use, as App.start does with its first health probe:
            # redis-py 8.1's cluster client, first used by several calls at once,
            # sometimes loses one of them on a connection it closes under it
            await small.initialize()
        await ledger.upsert_org("o", "pro")
        await led.sweep_all()  # loads the Function library
        for i in range(3):
            swept, r, (b,), ping = await asyncio.gather(
                led.sweep_all(),
                led.reserve(Subject("o"), [Charge(M, 10)], idempotency_key=f"s{i}"),
                led.get_balance(Subject("o"), [M]), led.ping())
            assert swept == 0
            assert r.decision is Decision.GRANTED
            assert b.meter == M
            assert ping is True
    finally:
        await led.aclose()
        await small.aclose()
