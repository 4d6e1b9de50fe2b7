"""On Redis Cluster each spend-path call is one round trip too: the FCALL goes straight to
the node of its keys, without first asking a server where they are (redis-py does that,
COMMAND GETKEYS on one fixed node, for every FCALL it cannot place itself)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio.cluster as aiocluster

from conftest import CLUSTER
from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger

pytestmark = pytest.mark.skipif(not CLUSTER, reason="routing on a Redis Cluster")

M = "message_tokens"
PRIMARIES = aiocluster.RedisCluster.PRIMARIES


async def _calls(redis: Any) -> dict[str, int]:
    per_node = await redis.info("commandstats", target_nodes=PRIMARIES)
    out: dict[str, int] = {}
    for stats in per_node.values():
        for name, v in stats.items():
            out[name] = out.get(name, 0) + int(v["calls"])
    return out


async def test_spend_calls_go_straight_to_their_node(redis: Any, ledger: Ledger) -> None:
    for org in ("o1", "o2", "o3"):  # orgs on different shards, most likely different nodes
        await ledger.upsert_org(org, "pro")
        r = await ledger.reserve(Subject(org), [Charge(M, 10)], idempotency_key="warm")
        await ledger.commit(r.reservation_id)  # the Function library is loaded everywhere
    await redis.config_resetstat(target_nodes=PRIMARIES)
    for org in ("o1", "o2", "o3"):
        r = await ledger.reserve(Subject(org), [Charge(M, 10)], idempotency_key="k")
        assert r.decision is Decision.GRANTED
        await ledger.commit(r.reservation_id, [Charge(M, 7)])
        assert (await ledger.check(Subject(org), M)).active
        (b,) = await ledger.get_balance(Subject(org), [M])
        assert b.used == 17
    calls = await _calls(redis)
    assert calls.get("cmdstat_command|getkeys", 0) == 0
    assert calls["cmdstat_fcall"] == 12  # the 4 calls of each of the 3 orgs
    await ledger.sweep_all()  # the sweeper's steps too
    assert (await _calls(redis)).get("cmdstat_command|getkeys", 0) == 0


async def test_a_new_client_used_by_many_calls_at_once_loses_none(
        redis_server: Any, ledger: Ledger) -> None:
    """A sidecar whose cluster client has not found the cluster yet (it started while the
    cluster was down, say) and then takes several calls at once answers all of them:
    the Ledger lets the first find the cluster while the others wait."""
    await ledger.upsert_org("o", "pro")
    for trial in range(20):
        fresh = aiocluster.RedisCluster.from_url(redis_server.seed_url, max_connections=12)
        led = Ledger(fresh, ledger.catalog, ledger.clock, ledger.keys)
        try:
            results = await asyncio.gather(*(
                led.reserve(Subject("o"), [Charge(M, 1)], idempotency_key=f"t{trial}-{i}")
                for i in range(8)), return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []
        finally:
            await led.aclose()
            await fresh.aclose()
