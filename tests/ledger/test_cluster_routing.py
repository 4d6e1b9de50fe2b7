"""On Redis Cluster each spend-path call is one round trip too: the FCALL goes straight to
the node of its keys, without first asking a server where they are (redis-py does that,
COMMAND GETKEYS on one fixed node, for every FCALL it cannot place itself)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from tls_files import tls_files

from conftest import CLUSTER
from quotagate import telemetry
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.mux import ClusterMux
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


async def test_the_spend_path_is_pipelined_to_each_primary(redis: Any, ledger: Ledger) -> None:
    """Concurrent spend calls share one pipelined connection per primary (ClusterMux),
    each sent to the primary that owns its org's shard."""
    assert isinstance(ledger.mux, ClusterMux)
    orgs = [f"p{i}" for i in range(12)]
    for org in orgs:
        await ledger.upsert_org(org, "pro")
    await redis.config_resetstat(target_nodes=PRIMARIES)
    results = await asyncio.gather(*(
        ledger.reserve(Subject(org), [Charge(M, 5)], idempotency_key=f"k{i}")
        for i in range(4) for org in orgs))
    assert all(r.decision is Decision.GRANTED for r in results)
    want: dict[str, int] = {}
    for org in orgs:
        node = redis.get_node_from_key(ledger.keys.cfg(org))
        want[node.name] = want.get(node.name, 0) + 4
    got = {}
    for node in redis.get_primaries():
        stats = await redis.info("commandstats", target_nodes=node)
        got[node.name] = int(stats.get("cmdstat_fcall", {}).get("calls", 0))
    assert {n: c for n, c in got.items() if c} == want
    assert len(ledger.mux._muxes) == len(want)  # one connection per primary used
    # and on each one the calls of concurrent requests leave together
    node = redis.get_node_from_key(ledger.keys.cfg("p0"))
    before = (await redis.info("stats", target_nodes=node))["total_reads_processed"]
    n = 200
    res = await asyncio.gather(*(ledger.reserve(Subject("p0"), [Charge(M, 1)],
                                                idempotency_key=f"b{i}") for i in range(n)))
    assert all(r.decision is Decision.GRANTED for r in res)
    reads = (await redis.info("stats", target_nodes=node))["total_reads_processed"] - before
    assert reads < n / 4, reads


def _direct(node: Any) -> Any:
    """A plain client of one node: cluster administration goes to exactly that node."""
    return aioredis.Redis(host=node.host, port=node.port)


async def _start_migration(redis: Any, slot: int, src: Any, dst: Any) -> None:
    """Redis Cluster's slot migration, the first half: IMPORTING/MIGRATING, then every
    key of the slot moved to `dst` (MIGRATE)."""
    async with _direct(src) as s, _direct(dst) as d:
        src_id, dst_id = (await s.execute_command("CLUSTER MYID")).decode(), \
            (await d.execute_command("CLUSTER MYID")).decode()
        await d.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while keys := await s.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            await s.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)


async def _finish_migration(redis: Any, slot: int, dst: Any) -> None:
    async with _direct(dst) as d:
        dst_id = (await d.execute_command("CLUSTER MYID")).decode()
    for node in redis.get_primaries():
        async with _direct(node) as c:
            await c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)


async def test_calls_follow_a_slot_that_moves(redis: Any, ledger: Ledger) -> None:
    """A shard's slot migrated to another primary while the sidecar runs: a Commit in the
    middle of the migration is sent on (ASK), a Reserve that would create keys there
    answers UNAVAILABLE and changes nothing, and once the slot has moved every call goes
    to its new owner (MOVED updates the slot map) without an error."""
    from redis.crc import key_slot

    from quotagate.errors import Unavailable

    await ledger.upsert_org("mv", "pro")
    held = await ledger.reserve(Subject("mv"), [Charge(M, 100)], idempotency_key="a")
    cfg = ledger.keys.cfg("mv")
    slot = key_slot(cfg.encode())
    src = redis.get_node_from_key(cfg)
    dst = next(n for n in redis.get_primaries() if n.name != src.name)
    try:
        await _start_migration(redis, slot, src, dst)
        r = await ledger.commit(held.reservation_id, [Charge(M, 60)])  # ASK, then ASKING
        assert r.amounts[0].amount == 60
        with pytest.raises(Unavailable):  # new keys mid-migration: TRYAGAIN, three times
            await ledger.reserve(Subject("mv"), [Charge(M, 10)], idempotency_key="b")
        await _finish_migration(redis, slot, dst)
        await redis.config_resetstat(target_nodes=PRIMARIES)
        for i in range(3):
            r2 = await ledger.reserve(Subject("mv"), [Charge(M, 10)], idempotency_key=f"c{i}")
            assert r2.decision is Decision.GRANTED
            await ledger.commit(r2.reservation_id)
        stats = await redis.info("commandstats", target_nodes=dst)
        assert int(stats["cmdstat_fcall"]["calls"]) == 6  # all of them on the new owner
        old = (await redis.info("commandstats", target_nodes=src)).get("cmdstat_fcall", {})
        assert int(old.get("rejected_calls", 0)) <= 1  # one MOVED, then the map knew
        # the redirections, counted and exported
        assert isinstance(ledger.mux, ClusterMux)
        seen = dict(ledger.mux.redirects)
        # the Commit and the refused Reserve were each sent on once (ASK), the Reserve then
        # met TRYAGAIN on both of its other tries; after the migration, one MOVED
        assert seen == {"ask": 2, "tryagain": 2, "moved": 1}, seen
        telemetry.watch_cluster(ledger.mux)
        scraped = {s.labels["kind"]: s.value
                   for m in telemetry.registry().collect() for s in m.samples
                   if s.name == "quotagate_redis_redirects_total"}
        assert all(scraped[k] >= v for k, v in seen.items()), scraped
        (b,) = await ledger.get_balance(Subject("mv"), [M])
        assert b.used == 60 + 30 and b.reserved == 0  # the refused Reserve held nothing
    finally:  # give the slot back (finished first if the test stopped half-way)
        await _finish_migration(redis, slot, dst)
        await _start_migration(redis, slot, dst, src)
        await _finish_migration(redis, slot, src)


async def _until(what: Any, seconds: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await what():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _replicated(clock: Any, cat: Any, org: str) -> AsyncIterator[Any]:
    """A cluster of its own in which the primary of `org`'s shard has a replica in sync;
    yields (ledger, replica client, the primary's RedisServer)."""
    from cluster_server import RedisCluster, cluster_port
    from quotagate.ledger.keys import Keys
    from redis_server import RedisServer

    cluster = RedisCluster().start()
    replica = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "2000", port=cluster_port()).start()
    r = aiocluster.RedisCluster.from_url(cluster.seed_url)
    led = Ledger(r, cat.catalog, clock, Keys(64))
    rep = aioredis.Redis(port=replica.port)
    assert isinstance(led.mux, ClusterMux)
    try:
        await led.upsert_plan("pro", [Allowance(M, 1_000_000)])
        await led.upsert_org(org, "pro")
        owner = r.get_node_from_key(led.keys.cfg(org))
        async with _direct(owner) as o:
            owner_id = (await o.execute_command("CLUSTER MYID")).decode()
        await rep.execute_command("CLUSTER MEET", "127.0.0.1", cluster.nodes[0].port)

        async def knows_owner() -> bool:
            nodes = await rep.execute_command("CLUSTER NODES")  # parsed: address -> node
            return any(n.get("node_id") == owner_id for n in nodes.values())
        await _until(knows_owner)
        await rep.execute_command("CLUSTER REPLICATE", owner_id)

        async def in_sync() -> bool:
            return (await rep.info("replication")).get("master_link_status") == "up"
        await _until(in_sync)
        yield led, rep, next(n for n in cluster.nodes if n.port == int(owner.port))
    finally:
        await led.aclose()
        await r.aclose()
        await rep.aclose()
        replica.close()
        cluster.close()


async def _promoted(rep: Any) -> None:
    async def master() -> bool:
        return (await rep.info("replication"))["role"] == "master"
    await _until(master)


async def test_calls_follow_a_failover(clock: Any, cat: Any) -> None:
    """A primary's replica takes over (CLUSTER FAILOVER) while the sidecar's connection
    still points at the old primary, now a replica: its next calls are redirected (MOVED)
    to the new primary, and the hold made before the failover commits there once."""
    async with _replicated(clock, cat, "fo") as (led, rep, _):
        held = await led.reserve(Subject("fo"), [Charge(M, 100)], idempotency_key="a")
        assert held.decision is Decision.GRANTED
        await rep.execute_command("CLUSTER FAILOVER")
        await _promoted(rep)
        done = await led.commit(held.reservation_id, [Charge(M, 70)])
        assert done.amounts[0].amount == 70
        again = await led.commit(held.reservation_id, [Charge(M, 70)])  # once only
        assert again.amounts[0].amount == 70
        r2 = await led.reserve(Subject("fo"), [Charge(M, 10)], idempotency_key="b")
        assert r2.decision is Decision.GRANTED
        (b,) = await led.get_balance(Subject("fo"), [M])
        assert (b.used, b.reserved) == (70, 10)
        stats = await rep.info("commandstats")
        assert int(stats["cmdstat_fcall"]["calls"]) >= 3  # on the new primary


async def test_a_lost_primary_is_unavailable_then_its_replica_serves(clock: Any,
                                                                     cat: Any) -> None:
    """A primary killed: calls for its shards answer UNAVAILABLE, fast, and change
    nothing; once the cluster has promoted its replica (node timeout 2 s here) the same
    worker's calls go there, with no restart, and a retried Reserve holds once."""
    from quotagate.errors import Unavailable

    async with _replicated(clock, cat, "lp") as (led, rep, primary):
        await led.reserve(Subject("lp"), [Charge(M, 100)], idempotency_key="warm")
        async with aioredis.Redis(port=primary.port) as p:
            assert await p.execute_command("WAIT", 1, 5000) == 1  # the replica has it
        assert primary.proc is not None
        primary.proc.kill()
        primary.proc.wait()
        t = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable):
            await led.reserve(Subject("lp"), [Charge(M, 10)], idempotency_key="retry")
        assert asyncio.get_running_loop().time() - t < 2  # not a hang
        await _promoted(rep)

        async def serves() -> bool:
            try:
                await led.reserve(Subject("lp"), [Charge(M, 10)], idempotency_key="retry")
                return True
            except Unavailable:
                return False
        await _until(serves)
        (b,) = await led.get_balance(Subject("lp"), [M])
        assert b.reserved == 110  # the warm-up hold and one retried Reserve, not more


async def test_a_tls_cluster_is_pipelined_too(clock: Any, tmp_path: Any) -> None:
    """`rediss+cluster://…?ssl_ca_certs=…`: the cluster client and the spend path's
    connections speak TLS, trusting that CA; the spend path is still one pipelined
    connection per primary. An option the URL may not carry is a setting error."""
    from cluster_server import RedisCluster
    from quotagate.app import App
    from quotagate.errors import ConfigError
    from quotagate.settings import Settings

    ca, cert, key = (str(p) for p in tls_files(tmp_path))
    try:
        cluster = RedisCluster(tls=(ca, cert, key)).start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    try:
        settings = Settings(listen="127.0.0.1:0", redis_url=f"{cluster.url}/?ssl_ca_certs={ca}",
                            data_dir=tmp_path, metrics_listen="127.0.0.1:0", shards=64)
        app = await App(settings, clock=clock).start()
        try:
            led = app.ledger
            assert isinstance(led.mux, ClusterMux) and led.mux.tls is not None
            await led.upsert_plan("pro", [Allowance(M, 1_000_000)])
            for org in ("t1", "t2", "t3"):
                await led.upsert_org(org, "pro")
            res = await asyncio.gather(*(
                led.reserve(Subject(org), [Charge(M, 3)], idempotency_key=f"k{i}")
                for i in range(20) for org in ("t1", "t2", "t3")))
            assert all(r.decision is Decision.GRANTED for r in res)
            await asyncio.gather(*(led.commit(r.reservation_id) for r in res))
            (b,) = await led.get_balance(Subject("t2"), [M])
            assert (b.used, b.reserved) == (60, 0)
            assert {a[1] for a in led.mux._muxes} <= set(cluster.tls_ports)
        finally:
            await app.stop()
        with pytest.raises(ConfigError) as e:
            App(Settings(redis_url=f"{cluster.url}/?ssl_nope=1", data_dir=tmp_path)
                ).redis_client(f"{cluster.url}/?ssl_nope=1")
        assert e.value.field == "QUOTAGATE_REDIS_URL"
    finally:
        cluster.close()
