"""The syncer's housekeeping: what would otherwise grow forever is removed, and nothing a
restore or a live syncer needs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import Sink
from quotagate.sync.syncer import GROUP, Syncer, SyncOptions

M = "message_tokens"
DAY_MS = 86_400_000


async def test_resolved_hold_snapshots_pruned_after_the_retention(
        redis: Any, ledger: Ledger, sink: Sink) -> None:
    syncer = Syncer(redis, ledger.keys, sink, ledger.catalog, SyncOptions(consumer="me"))
    await ledger.upsert_org("o", "pro")
    done = []
    for i in range(3):
        r = await ledger.reserve(Subject("o"), [Charge(M, 50)], idempotency_key=f"c{i}")
        assert r.decision is Decision.GRANTED
        done.append(r.reservation_id)
    await ledger.commit(done[0], [Charge(M, 20)])
    await ledger.refund(done[1])
    await ledger.commit(done[2], [])
    held = await ledger.reserve(Subject("o"), [Charge(M, 70)], idempotency_key="open",
                                ttl_seconds=3600)
    await syncer.run_once()
    kinds = {s.redis_key: s for s in await sink.snapshots()}
    holds = {k for k, s in kinds.items() if s.kind == "hold"}
    assert holds == {ledger.keys.hold(r) for r in [*done, held.reservation_id]}

    # within the retention nothing goes
    assert (await syncer.housekeeping(consumer_idle_ms=DAY_MS))[0] == 0
    assert len(await sink.snapshots()) == len(kinds)

    # past it: the three resolved holds go, the open one and every other kind stay
    later = int(time.time() * 1000) + DAY_MS + 60_000
    pruned, _ = await syncer.housekeeping(now_ms=later, consumer_idle_ms=DAY_MS)
    assert pruned == 3
    left = {s.redis_key: s for s in await sink.snapshots()}
    assert set(left) == set(kinds) - {ledger.keys.hold(r) for r in done}
    assert left[ledger.keys.hold(held.reservation_id)].data["st"] == "H"
    assert {s.kind for s in left.values()} >= {"cfg", "bal", "hold"}
    assert (await syncer.housekeeping(now_ms=later, consumer_idle_ms=DAY_MS))[0] == 0


async def test_idle_consumers_without_pending_entries_are_deleted(
        redis: Any, ledger: Ledger, sink: Sink) -> None:
    await ledger.upsert_org("o", "pro")
    r = await ledger.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="k")
    assert r.decision is Decision.GRANTED
    me = Syncer(redis, ledger.keys, sink, ledger.catalog, SyncOptions(consumer="me"))
    await me.ensure_groups()
    stream = ledger.keys.ledger(ledger.keys.shard_of("o"))
    # a syncer that died holding an entry, one that stopped cleanly, and this one
    await redis.xreadgroup(GROUP, "died-busy", {stream: ">"}, count=1)
    await redis.xgroup_createconsumer(stream, GROUP, "stopped")
    await redis.xgroup_createconsumer(stream, GROUP, "me")
    await asyncio.sleep(0.05)

    def names(cs: list[dict[str, Any]]) -> set[str]:
        return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in cs}

    # a consumer idle for less than the threshold stays
    assert (await me.housekeeping(consumer_idle_ms=60_000))[1] == 0
    assert names(await redis.xinfo_consumers(stream, GROUP)) == {"died-busy", "stopped", "me"}

    assert (await me.housekeeping(consumer_idle_ms=10))[1] == 1
    # the busy one keeps its entry for a live syncer to claim; ours is never deleted
    assert names(await redis.xinfo_consumers(stream, GROUP)) == {"died-busy", "me"}
    assert (await redis.xpending(stream, GROUP))["pending"] == 1
    c = await me.run_once()
    assert c.inserted >= 1
