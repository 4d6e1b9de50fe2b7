"""The syncer against real Redis and real SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.ledger.model import Charge, HoldState, Subject
from quotagate.ledger.store import Ledger
from quotagate.settings import Settings
from quotagate.sync.restore import (
    WALLET,
    merge_balance,
    merge_union,
    merge_wallet,
    packed,
    restore,
)
from quotagate.sync.sink import Sink, UsageQuery, open_sink
from quotagate.sync.syncer import GROUP, Syncer, SyncOptions
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

from .workload import (
    ORGS,
    Workload,
    assert_sql_matches_redis,
    setup_orgs,
    stream_backlog,
    subjects,
)


async def test_migrate_is_versioned_and_idempotent(sink: Sink) -> None:
    assert await sink.migrate() == []  # the fixture applied 0001 already


async def test_random_workload_sql_totals_equal_redis(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """(a) thousands of reserves, commits (less and more than held: debt), releases,
    refunds after commit, top-ups (some repeated), expiries and late commits, synced in
    several rounds: SQL has every entry once and its totals equal the Redis balances."""
    await setup_orgs(ledger)
    work = Workload(ledger)
    stored = 0
    for _ in range(4):
        await work.run(800, clock=clock)
        backlog = await stream_backlog(redis, ledger)
        counts = await syncer.run_once()
        assert counts.inserted == counts.read == backlog  # each entry once, nothing lost
        assert await stream_backlog(redis, ledger) == 0   # acked entries are deleted
        stored += counts.inserted
    await work.settle()
    await ledger.sweep_all()
    stored += (await syncer.run_once()).inserted
    assert work.ops > 3000 and stored > 3000
    await assert_sql_matches_redis(ledger, sink)

    # a batch delivered again inserts nothing and counts nothing twice
    before = {org: await sink.usage(UsageQuery(org, limit=1000)) for org in ORGS}
    entries = [e for e in (await _all_entries(sink))]
    assert await sink.write(entries, []) == 0
    assert {org: await sink.usage(UsageQuery(org, limit=1000)) for org in ORGS} == before
    assert len(entries) == stored


async def _all_entries(sink: Sink) -> list[Any]:
    """Rebuild Entry rows from SQL (their raw fields) to deliver them a second time."""
    from quotagate.sync import sink as sk

    if sink.url.startswith("sqlite"):
        rows = await sink._run(lambda c: c.execute(  # type: ignore[attr-defined]
            "SELECT shard, stream_id, raw FROM ledger_entries").fetchall())
    else:
        async with sink._locks["r"]:  # type: ignore[attr-defined]
            conn = await sink._conn("r")  # type: ignore[attr-defined]
            async with conn.transaction():
                cur = await conn.execute("SELECT shard, stream_id, raw FROM ledger_entries")
                rows = await cur.fetchall()
    import json

    return [sk.entry_of(int(r[0]), r[1], json.loads(r[2])) for r in rows]


def _env(redis_server: Any, sink_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env.update(QUOTAGATE_REDIS_URL=redis_server.url, QUOTAGATE_DATABASE_URL=sink_url,
               QUOTAGATE_SHARDS="64", QUOTAGATE_DATA_DIR=str(tmp_path / "data"),
               QUOTAGATE_SYNC_BATCH_SIZE="100000", **extra)
    return env


async def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quotagate", *args],
                                   env=env, capture_output=True, text=True, timeout=60)


async def test_syncer_killed_between_commit_and_ack_counts_nothing_twice(
        redis_server: Any, redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink,
        sink_url: str, tmp_path: Path) -> None:
    """(b) `quotagate sync` as a real process dies right after its SQL commit, before
    XACK (the fault hook); a restarted one claims the batch from the dead consumer,
    writes nothing twice, and goes on with new entries."""
    await setup_orgs(ledger)
    work = Workload(ledger, seed=11)
    await work.run(600, clock=clock)
    first = await stream_backlog(redis, ledger)

    victim = await _run(["sync"], _env(redis_server, sink_url, tmp_path,
                                       QUOTAGATE_SYNC_CONSUMER="victim",
                                       QUOTAGATE_FAULT_EXIT_AFTER_COMMIT="1"))
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    async with _reader(sink) as count:
        assert await count() == first            # committed to SQL ...
    pending = 0
    for s in range(ledger.keys.shards):
        pending += (await redis.xpending(ledger.keys.ledger(s), GROUP))["pending"]
    assert pending == first                      # ... but never acknowledged

    await work.run(300, clock=clock)            # more entries while no syncer runs
    await work.settle()
    total = await stream_backlog(redis, ledger)  # the stream still holds the first batch
    await asyncio.sleep(0.3)                     # > claim idle time below
    survivor = await _run(["sync", "--once", "--log-level", "INFO"], _env(
        redis_server, sink_url, tmp_path, QUOTAGATE_SYNC_CONSUMER="survivor",
        QUOTAGATE_SYNC_CLAIM_IDLE_MS="200"))
    assert survivor.returncode == 0, survivor.stderr
    assert f"synced {total} entries ({total - first} new)" in survivor.stderr
    async with _reader(sink) as count:
        assert await count() == total
    assert await stream_backlog(redis, ledger) == 0
    await assert_sql_matches_redis(ledger, sink)


class _reader:
    """`async with _reader(sink) as count`: count() = rows in ledger_entries."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def __aenter__(self) -> Any:
        async def count() -> int:
            return len(await _all_entries(self.sink))
        return count

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_sql_down_service_answers_entries_wait_then_arrive(
        redis_server: Any, redis: Any, clock: ManualClock, sink: Sink, dead_url: str,
        tmp_path: Path) -> None:
    """(c) with the database unreachable the service keeps answering, the entries wait in
    Redis (lag visible in the syncer and on /metrics); with the database back they all
    arrive, none lost, none twice."""
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, database_url=dead_url,
                        sync_poll_ms=20, metrics_listen="127.0.0.1:0", data_dir=tmp_path)
    app = await App(settings, clock=clock).start()
    try:
        assert app.ledger is not None and app.syncer is not None and app.metrics is not None
        await setup_orgs(app.ledger)
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            quota = quota_pb2_grpc.QuotaServiceStub(ch)
            for i in range(60):
                org = ORGS[i % len(ORGS)]
                r = await quota.Reserve(quota_pb2.ReserveRequest(
                    subject=common_pb2.Subject(org_id=org, seat_id="s3"),
                    idempotency_key=f"dead-{i}",
                    charges=[common_pb2.Charge(meter="message_tokens", amount=100 + i)]))
                assert r.decision == common_pb2.DECISION_GRANTED
                c = await quota.Commit(quota_pb2.CommitRequest(
                    reservation_id=r.reservation_id,
                    actual=[common_pb2.Charge(meter="message_tokens", amount=50 + i)]))
                assert c.state == common_pb2.HOLD_STATE_COMMITTED
        await asyncio.sleep(0.3)  # the in-process syncer tries, and fails
        waiting = await stream_backlog(redis, app.ledger)
        assert waiting >= 120
        lag = await app.syncer.refresh_lag()
        assert sum(n for n, _ in lag.values()) == waiting
        assert max(s for _, s in lag.values()) > 0
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{app.metrics.port}/metrics", timeout=5).read().decode())
        assert "quotagate_sync_lag_entries" in text and "quotagate_sync_lag_seconds" in text

        app.syncer.sink = sink  # the database is back
        await app.syncer.run_once()
        for _ in range(100):
            if not await stream_backlog(redis, app.ledger):
                break
            await asyncio.sleep(0.05)
        assert await stream_backlog(redis, app.ledger) == 0
        async with _reader(sink) as count:
            assert await count() == waiting
        await assert_sql_matches_redis(app.ledger, sink)
    finally:
        await app.stop()


async def test_flushall_then_restore_gives_every_balance_back(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """(d) after Redis loses everything, `restore` brings back every balance as it was:
    all wallets (org, team, seat; with transfers), reserved amounts, open holds (which
    the sweeper finds again and which can still be committed)."""
    await setup_orgs(ledger)
    work = Workload(ledger, seed=23)
    await work.run(1500, clock=clock, transfers=True)
    await syncer.run_once()
    subs = [s for org in ORGS for s in subjects(org)]
    before = [await ledger.get_balance(s) for s in subs]
    still_held = [rid for rid in work.open
                  if (await redis.hget(ledger.keys.hold(rid), "st")) == b"H"]
    assert still_held
    exp = {rid: await redis.zscore(ledger.keys.expiries(
        ledger.keys.shard_of_reservation(rid)), rid) for rid in still_held}

    await redis.flushall()
    counts = await restore(redis, ledger.keys, sink)
    assert counts.holds == len(still_held)
    assert [await ledger.get_balance(s) for s in subs] == before
    for rid in still_held:
        assert await redis.zscore(ledger.keys.expiries(
            ledger.keys.shard_of_reservation(rid)), rid) == exp[rid]
    r = await ledger.commit(still_held[0])
    assert r.state == HoldState.COMMITTED

    # restore twice changes nothing; the syncer picks up again after the loss
    await restore(redis, ledger.keys, sink)
    await syncer.run_once()
    assert (await ledger.get_balance(Subject(ORGS[0])))[0].meter == "message_tokens"


def _w(**kv: int) -> str:
    """A packed wallet (lib.lua's WF order, a JSON array) with the given counters, others 0."""
    return "[" + ",".join(str(kv.get(name, 0)) for name in WALLET) + "]"


def _w_comma(**kv: int) -> str:
    """The same wallet as builds before the JSON array wrote it."""
    return _w(**kv)[1:-1]


async def test_restore_merge_keeps_what_redis_still_knows() -> None:
    redis_h = {"w": _w(p=5, mu=50, tu=1, tb=100, mh=3), "d": "9", "evseq": "4",
               "S:x:w": _w(p=6, cu=1), "ev": "5||0"}
    sql_h = {"w": _w(p=5, mu=40, tu=7, tb=120, mh=7, mg=10), "d": "2", "evseq": "7",
             "S:x:w": _w(p=5, cu=99), "T:t:w": _w(p=5, tb=4), "ev": "5|80|0",
             "iac": "0"}  # a count of another key's entries: never restored
    assert merge_balance(redis_h, sql_h) == {
        # same period: mu, tu, mg the larger; tb the smaller; mh (other) SQL's
        "w": _w(p=5, mu=50, tu=7, tb=100, mh=7, mg=10),
        "T:t:w": _w(p=5, tb=4),   # a wallet Redis lost entirely
        "evseq": "7",             # only grows: the larger
        "ev": "5|80|0",           # other fields: SQL's
    }                             # d: Redis larger; S:x: Redis holds a newer period
    # SQL's newer period wins the whole wallet; an unreadable Redis copy yields to SQL's
    assert merge_wallet(_w(p=4, mu=99), _w(p=5, mu=1)) == _w(p=5, mu=1)
    assert merge_wallet("garbage", _w(p=5)) == _w(p=5)
    # snapshots (or Redis) in the comma-separated form of earlier builds merge the same
    assert merge_wallet(_w_comma(p=5, mu=50, tb=100), _w(p=5, mu=40, tb=120, mg=10)) \
        == _w(p=5, mu=50, tb=100, mg=10)
    assert merge_wallet(_w(p=4, mu=99), _w_comma(p=5, mu=1)) == _w_comma(p=5, mu=1)
    assert merge_union({"a": "1"}, {"a": "2", "b": "3"}) == {"b": "3"}


async def test_restore_packs_snapshots_of_the_earlier_layout() -> None:
    old = {"p": "5", "mg": "10", "mu": "4", "tb": "7", "d": "2", "ev": "5||0",
           "T:t:p": "5", "T:t:mg": "3", "S:x:p": "5", "S:x:cu": "1", "evseq": "3"}
    assert packed(old) == {"w": _w(p=5, mg=10, mu=4, tb=7), "T:t:w": _w(p=5, mg=3),
                           "S:x:w": _w(p=5, cu=1), "d": "2", "ev": "5||0", "evseq": "3"}
    # into an empty Redis it writes the packed wallets; Redis's newer copy is merged
    assert merge_balance({}, old)["w"] == _w(p=5, mg=10, mu=4, tb=7)
    assert merge_balance({"w": _w(p=5, mu=9, tb=5)}, old)["w"] == _w(p=5, mg=10, mu=9, tb=5)


async def test_sink_down_at_start_is_not_fatal(
        redis: Any, ledger: Ledger, dead_url: str, sink: Sink) -> None:
    dead = open_sink(dead_url)
    syncer = Syncer(redis, ledger.keys, dead, ledger.catalog, SyncOptions(consumer="c"))
    await setup_orgs(ledger)
    await ledger.topup(ORGS[0], "message_tokens", 10, "p1")
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
        await syncer.run_once()
    syncer.sink = sink
    c = await syncer.run_once()
    assert c.inserted == c.read > 0
    await dead.close()
    r = await ledger.reserve(Subject(ORGS[0]), [Charge("message_tokens", 5)],
                             idempotency_key="k")
    assert r.reservation_id


async def test_cli_migrate_sync_restore(redis_server: Any, redis: Any, ledger: Ledger,
                                        sink_url: str, tmp_path: Path) -> None:
    env = _env(redis_server, sink_url, tmp_path)
    first = await _run(["migrate"], env)
    assert first.returncode == 0 and "applied 0001_init" in first.stdout, first.stderr
    again = await _run(["migrate"], env)
    assert again.returncode == 0 and "schema up to date" in again.stdout
    await setup_orgs(ledger)
    assert (await _run(["sync", "--once"], env)).returncode == 0
    before = await ledger.get_balance(Subject(ORGS[1]))
    await redis.flushall()
    done = await _run(["restore"], env)
    assert done.returncode == 0 and "restored" in done.stdout, done.stderr
    assert await ledger.get_balance(Subject(ORGS[1])) == before
