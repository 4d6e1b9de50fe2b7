"""A durability review of the syncer (stream -> SQL), against real Redis and real SQL
(SQLite and PostgreSQL): random interleavings of writes, syncs, injected failures,
cancellations and restarts; poison entries; two syncers at once; a killed `quotagate
sync`; the database connection dropped mid-transaction.

The oracle is the ledger streams themselves: every entry the scripts wrote is read
(XRANGE) before any syncer could delete it, and SQL must hold exactly those entries,
once each, with usage_totals and period_totals equal to the sums of their net usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync import sink as sk
from quotagate.sync.restore import balance_text, restore
from quotagate.sync.sink import Sink
from quotagate.sync.syncer import Syncer, SyncOptions

from .workload import ORGS, Workload, assert_sql_matches_redis, setup_orgs, stream_backlog

M = "message_tokens"


# -- the oracle and SQL, read without the sink under test ---------------------------------
async def capture(redis: Any, ledger: Ledger) -> dict[str, dict[str, bytes]]:
    """Every entry now in a ledger stream: entry_id -> raw fields."""
    pipe = redis.pipeline(transaction=False)
    for s in range(ledger.keys.shards):
        pipe.xrange(ledger.keys.ledger(s))
    out = {}
    for s, items in enumerate(await pipe.execute()):
        for sid, fields in items:
            out[f"{s}-{sid.decode()}"] = fields
    return out


def expected_net(fields: dict[str, bytes], shard: int, sid: str) -> tuple[str, str, int]:
    e = sk.entry_of(shard, sid, fields)
    return e.org, e.meter, e.net


def _sql(url: str, query: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            with conn:
                return list(conn.execute(query).fetchall())
        finally:
            conn.close()
    with psycopg.connect(url, autocommit=True) as c:
        cur = c.execute(query)
        return list(cur.fetchall()) if cur.description else []


async def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(_sql, url, query)


async def reset_sql(url: str) -> None:
    for t in ("ledger_entries", "usage_totals", "period_totals", "state_snapshots"):
        await sql(url, f"DELETE FROM {t}")


async def entries_added(redis: Any, ledger: Ledger) -> dict[int, int]:
    """Per shard: how many entries were ever appended to its ledger stream (Redis 7's
    XINFO STREAM entries-added; unlike XRANGE it cannot race a syncer's XDEL)."""
    pipe = redis.pipeline(transaction=False)
    for s in range(ledger.keys.shards):
        pipe.xinfo_stream(ledger.keys.ledger(s))
    out = {}
    for s, info in enumerate(await pipe.execute(raise_on_error=False)):
        if isinstance(info, Exception):
            continue  # no stream: nothing written to the shard
        if "entries-added" not in info:
            pytest.skip("needs Redis 7 (XINFO STREAM entries-added)")
        if info["entries-added"]:
            out[s] = int(info["entries-added"])
    return out


async def assert_every_entry_once(url: str, redis: Any, ledger: Ledger,
                                  written: dict[str, dict[str, bytes]],
                                  poison: set[str] | None = None,
                                  complete: bool = False) -> None:
    """SQL holds each entry ever appended once (per shard as many as were appended, every
    one seen in the streams among them; `complete`: exactly those seen), poison ones
    with no usage, and usage_totals / period_totals are the sums of the stored entries'
    net usage (and, `complete`, of the net usage of the entries seen)."""
    poison = poison or set()
    rows = await sql(url, "SELECT entry_id, shard, org, meter, net FROM ledger_entries")
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids))
    assert set(written) <= set(ids), sorted(set(written) - set(ids))[:5]
    if complete:
        assert set(ids) == set(written), sorted(set(ids) - set(written))[:5]
    per_shard: dict[int, int] = {}
    for r in rows:
        per_shard[int(r[1])] = per_shard.get(int(r[1]), 0) + 1
    assert per_shard == await entries_added(redis, ledger)
    stored: dict[tuple[str, str], int] = {}
    for eid, _shard, org, meter, net in rows:
        if eid in poison:
            assert net == 0, eid
        elif net:
            stored[(org, meter)] = stored.get((org, meter), 0) + int(net)
    stored = {k: v for k, v in stored.items() if v}  # a commit refunded in full: 0
    if complete:
        want: dict[tuple[str, str], int] = {}
        for eid, fields in written.items():
            if eid in poison:
                continue
            shard, sid = eid.split("-", 1)
            org, meter, net = expected_net(fields, int(shard), sid)
            if net:
                want[(org, meter)] = want.get((org, meter), 0) + net
        assert stored == {k: v for k, v in want.items() if v}
    for table in ("usage_totals", "period_totals"):
        totals = {(o, m): int(a) for o, m, a in await sql(
            url, f"SELECT org, meter, SUM(amount) FROM {table} GROUP BY org, meter")}
        assert {k: v for k, v in totals.items() if v} == stored, table


# -- failure injection --------------------------------------------------------------------
class Faulty:
    """A real sink with one injected fault on the next write: 'before' (SQL gone before the
    commit), 'after' (committed, the answer lost), 'hang_before' / 'hang_after' (the write
    never returns: the test cancels the syncer there, as a process killed mid-batch)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.url = inner.url
        self.fault = ""
        self.entered = asyncio.Event()

    async def migrate(self) -> list[str]:
        return await self.inner.migrate()

    async def write(self, entries: Sequence[sk.Entry], snapshots: Sequence[sk.Snapshot]) -> int:
        fault, self.fault = self.fault, ""
        if fault == "before":
            raise ConnectionError("injected: the database went away")
        if fault == "hang_before":
            self.entered.set()
            await asyncio.Event().wait()
        n = await self.inner.write(entries, snapshots)
        if fault == "after":
            raise ConnectionError("injected: the commit's answer was lost")
        if fault == "hang_after":
            self.entered.set()
            await asyncio.Event().wait()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_syncer(redis: Any, ledger: Ledger, sink: Any, name: str, **kw: Any) -> Syncer:
    opt = dict(batch_size=7, consumer=name, claim_idle_ms=0)  # small batches: many rounds
    opt.update(kw)
    return Syncer(redis, ledger.keys, sink, ledger.catalog, SyncOptions(**opt))  # type: ignore[arg-type]


#: malformed entries as an older build (or a hand-made XADD) may have left them: an
#: undecodable escape, a time past year 9999, an amount past BIGINT, a NUL (PostgreSQL
#: text cannot hold one), bytes that are not UTF-8
POISON: dict[str, dict[str, Any]] = {
    "escape": {"type": "commit", "org": "bad%ffid", "meter": M, "amount": "5"},
    "time": {"type": "commit", "org": "acme", "meter": M, "amount": "5",
             "at": "99999999999999999"},
    "amount": {"type": "commit", "org": "acme", "meter": M,
               "amount": "99999999999999999999999"},
    "nul": {"type": "commit", "org": "acme", "team": "t%00x", "meter": M, "amount": "5"},
    "bytes": {"type": "refund", "org": b"\xff\xfeorg", "meter": M, "amount": "5"},
}


async def add_poison(redis: Any, ledger: Ledger, kind: str, org: str = "acme") -> str:
    shard = ledger.keys.shard_of(org)
    sid = await redis.xadd(ledger.keys.ledger(shard), POISON[kind])
    return f"{shard}-{sid.decode()}"


# -- poison entries -----------------------------------------------------------------------
async def test_poison_entries_do_not_stop_the_sync(
        redis: Any, ledger: Ledger, sink: Sink, sink_url: str) -> None:
    """A malformed entry among good ones on the same shard (and on others): the good ones
    reach SQL and are counted, the bad one is stored once with no usage, and the stream
    drains. Before the fix one such entry failed every batch of every shard, forever."""
    await ledger.upsert_org("acme", "pro")
    await ledger.upsert_org("other", "pro")
    bad = set()
    for kind in POISON:
        r = await ledger.reserve(Subject("acme"), [Charge(M, 10)], idempotency_key=kind)
        assert r.decision is Decision.GRANTED
        bad.add(await add_poison(redis, ledger, kind))
        await ledger.commit(r.reservation_id, [Charge(M, 7)])
        r2 = await ledger.reserve(Subject("other"), [Charge(M, 3)], idempotency_key=kind)
        await ledger.commit(r2.reservation_id)
    written = await capture(redis, ledger)
    syncer = make_syncer(redis, ledger, sink, "p", batch_size=1000)
    await syncer.run_once()
    assert await stream_backlog(redis, ledger) == 0
    await assert_every_entry_once(sink_url, redis, ledger, written, bad, complete=True)
    assert await _usage(sink, "acme") == 7 * len(POISON)
    assert await _usage(sink, "other") == 3 * len(POISON)


async def _usage(sink: Sink, org: str) -> int:
    return sum(r.amount for r in await sink.usage(sk.UsageQuery(org, M, limit=10)))


# -- the property: random interleavings ---------------------------------------------------
STEP = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, len(ORGS) - 1), st.integers(1, 400)),
    st.tuples(st.just("commit"), st.integers(0, 1_000), st.integers(0, 600)),
    st.tuples(st.just("refund"), st.integers(0, 1_000), st.integers(0, 200)),
    st.tuples(st.just("topup"), st.integers(0, len(ORGS) - 1), st.integers(1, 9)),
    st.tuples(st.just("poison"), st.sampled_from(sorted(POISON)), st.integers(0, 2)),
    st.tuples(st.just("sync"), st.sampled_from(
        ["ok", "ok", "before", "after", "hang_before", "hang_after", "restart"]),
        st.integers(1, 3)),
)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=4, max_size=28))
async def test_property_sql_equals_exactly_the_entries_written(
        redis: Any, ledger: Ledger, sink: Sink, sink_url: str,
        steps: list[tuple[str, Any, Any]]) -> None:
    """Whatever the interleaving of writes, syncs, faults before and after the commit,
    cancellations mid-batch (before and after the commit) and restarts under a new
    consumer name: after a final sync SQL holds exactly the entries written, once each,
    the totals are their sums, and (holds settled) SQL's usage equals Redis's."""
    await redis.flushall()
    await reset_sql(sink_url)
    await setup_orgs(ledger)
    written: dict[str, dict[str, bytes]] = {}
    poison: set[str] = set()
    held: list[str] = []
    committed: list[str] = []
    faulty = Faulty(sink)
    gen = 0
    syncer = make_syncer(redis, ledger, faulty, f"c{gen}")
    n = 0
    for op, a, b in steps:
        n += 1
        if op == "reserve":
            r = await ledger.reserve(Subject(ORGS[a], "t1", "s 2"), [Charge(M, b)],
                                     idempotency_key=f"k{n}")
            if r.decision is Decision.GRANTED:
                held.append(r.reservation_id)
        elif op == "commit" and held:
            rid = held.pop(a % len(held))
            await ledger.commit(rid, [Charge(M, b)])
            committed.append(rid)
        elif op == "refund" and committed:
            rid = committed[a % len(committed)]
            with contextlib.suppress(Exception):  # more than was charged: refused
                await ledger.refund(rid, [Charge(M, b)] if b else [], reason="r")
        elif op == "topup":
            await ledger.topup(ORGS[a], M, 100 * b, f"p{b}")  # repeats are idempotent
        elif op == "poison":
            poison.add(await add_poison(redis, ledger, a, ORGS[b]))
        elif op == "sync":
            written.update(await capture(redis, ledger))
            if a == "restart":  # the process died; another one (new consumer) takes over
                gen += 1
                syncer = make_syncer(redis, ledger, faulty, f"c{gen}")
                continue
            faulty.fault = "" if a == "ok" else a
            faulty.entered.clear()
            task = asyncio.ensure_future(syncer.run_once(max_rounds=b))
            if a.startswith("hang"):
                entered = asyncio.ensure_future(faulty.entered.wait())
                await asyncio.wait({task, entered}, return_when=asyncio.FIRST_COMPLETED)
                entered.cancel()
                task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
            faulty.fault = ""
    for rid in held:  # settle, so that Redis's `used` is what SQL must show
        await ledger.refund(rid)
    written.update(await capture(redis, ledger))
    final = make_syncer(redis, ledger, sink, "final", batch_size=1000)
    await final.run_once()
    await final.run_once()
    assert await stream_backlog(redis, ledger) == 0
    await assert_every_entry_once(sink_url, redis, ledger, written, poison, complete=True)
    await assert_sql_matches_redis(ledger, sink)


# -- snapshots ----------------------------------------------------------------------------
class Gated:
    """A real sink whose writes wait at a gate (a syncer slow to reach SQL)."""

    def __init__(self, inner: Sink) -> None:
        self.inner, self.url = inner, inner.url
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def migrate(self) -> list[str]:
        return await self.inner.migrate()

    async def write(self, entries: Sequence[sk.Entry], snapshots: Sequence[sk.Snapshot]) -> int:
        self.entered.set()
        await self.release.wait()
        return await self.inner.write(entries, snapshots)


async def test_a_slow_syncer_does_not_overwrite_a_newer_snapshot(
        redis: Any, ledger: Ledger, sink: Sink) -> None:
    """Two syncers (two sidecars): A snapshots org x, then is slow to commit; meanwhile x
    changes and B syncs the newer state. A's commit must not put the older snapshot back
    over B's: a restore after a Redis loss would give back the older balance (a top-up
    lost, or usage forgiven)."""
    k = ledger.keys
    await ledger.upsert_org("x", "pro")
    b = make_syncer(redis, ledger, sink, "b", claim_idle_ms=60_000, batch_size=1000)
    await b.run_once()
    await ledger.topup("x", M, 1_000, "old")
    gated = Gated(sink)
    a = make_syncer(redis, ledger, gated, "a", claim_idle_ms=60_000, batch_size=1000)
    slow = asyncio.ensure_future(a.run_once())
    await asyncio.wait_for(gated.entered.wait(), 10)  # A has its (older) snapshot
    await ledger.topup("x", M, 2_000, "new")
    r = await ledger.reserve(Subject("x"), [Charge(M, 300)], idempotency_key="r")
    await ledger.commit(r.reservation_id)
    await asyncio.sleep(0.01)                          # B's snapshot is a later one
    await b.run_once()
    gated.release.set()
    await asyncio.wait_for(slow, 10)
    now = balance_text(await redis.hgetall(k.bal("x", M)))
    snaps = {s.redis_key: s for s in await sink.snapshots()}
    assert dict(snaps[k.bal("x", M)].data) == now
    assert "new" in str(dict(snaps[k.purchases("x")].data))

    before = await ledger.get_balance(Subject("x"), [M])
    await redis.flushall()                            # Redis lost everything
    await restore(redis, k, sink)
    assert await ledger.get_balance(Subject("x"), [M]) == before


# -- two syncers at once ------------------------------------------------------------------
async def test_two_syncers_at_once_count_each_entry_once(
        redis: Any, ledger: Ledger, sink: Sink, sink_url: str) -> None:
    """Two in-process syncers (two sidecars) run side by side while traffic flows, each
    claiming the other's in-flight entries at once (claim idle 0: the worst case): every
    entry is stored and counted once, and neither deadlocks (PostgreSQL row locks)."""
    await setup_orgs(ledger)
    other = sk.open_sink(sink_url)  # the second sidecar's own connection
    try:
        one = make_syncer(redis, ledger, sink, "one", poll_ms=1, batch_size=20)
        two = make_syncer(redis, ledger, other, "two", poll_ms=1, batch_size=20)
        tasks = [asyncio.ensure_future(s.run()) for s in (one, two)]
        written: dict[str, dict[str, bytes]] = {}
        work = Workload(ledger, seed=5)
        # at least 12 rounds of traffic, and on until both syncers have stored some (on a
        # busy machine one may get the first rounds all to itself)
        for i in range(120):
            await work.run(40)
            written.update(await capture(redis, ledger))
            await asyncio.sleep(0.01)
            if i >= 11 and one.total.inserted and two.total.inserted:
                break
        await work.settle()
        written.update(await capture(redis, ledger))
        deadline = time.monotonic() + 30
        while await stream_backlog(redis, ledger) and time.monotonic() < deadline:
            written.update(await capture(redis, ledger))
            await asyncio.sleep(0.02)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        last = make_syncer(redis, ledger, sink, "last", batch_size=1000)
        await last.run_once()
        assert await stream_backlog(redis, ledger) == 0
        await assert_every_entry_once(sink_url, redis, ledger, written)
        await assert_sql_matches_redis(ledger, sink)
        # nobody claims to have inserted an entry another one inserted too
        assert one.total.inserted + two.total.inserted + last.total.inserted <= sum(
            (await entries_added(redis, ledger)).values())
        assert one.total.inserted and two.total.inserted  # both did work
    finally:
        await other.close()


# -- cancelled at random points of a real write, the same sink reused ---------------------
async def test_cancelled_at_random_points_the_sink_recovers(
        redis: Any, ledger: Ledger, sink: Sink, sink_url: str) -> None:
    """The syncer task cancelled at random moments (mid-COPY, mid-INSERT, mid-COMMIT on
    PostgreSQL; a SQLite write runs on in its thread): the same sink keeps working and
    nothing is lost or counted twice."""
    await setup_orgs(ledger)
    rng = random.Random(3)
    work = Workload(ledger, seed=9)
    written: dict[str, dict[str, bytes]] = {}
    for i in range(12):
        await work.run(60)
        written.update(await capture(redis, ledger))
        s = make_syncer(redis, ledger, sink, f"r{i % 3}", batch_size=50)
        task = asyncio.ensure_future(s.run_once())
        await asyncio.sleep(rng.uniform(0, 0.03))
        task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
    await work.settle()
    written.update(await capture(redis, ledger))
    final = make_syncer(redis, ledger, sink, "final", batch_size=1000)
    await final.run_once()
    assert await stream_backlog(redis, ledger) == 0
    await assert_every_entry_once(sink_url, redis, ledger, written, complete=True)
    await assert_sql_matches_redis(ledger, sink)


# -- the database connection dropped mid-transaction, then back ---------------------------
async def test_postgres_connection_killed_mid_transaction(
        redis: Any, ledger: Ledger, backend: str, sink_url: str) -> None:
    """The server ends the syncer's session in the middle of its batch (a failover, an
    admin's pg_terminate_backend): the batch stays pending, the sink reconnects, and the
    next round stores everything once."""
    if backend != "postgres":
        pytest.skip("a PostgreSQL session")
    app = f"qg_review_{os.getpid()}_{random.randrange(10**9)}"
    url = f"{sink_url}&application_name={app}"
    pg = sk.open_sink(url)
    await pg.migrate()
    await setup_orgs(ledger)
    work = Workload(ledger, seed=13)
    written: dict[str, dict[str, bytes]] = {}
    try:
        for i in range(6):
            await work.run(80)
            written.update(await capture(redis, ledger))
            s = make_syncer(redis, ledger, pg, "pg", batch_size=40)
            task = asyncio.ensure_future(s.run_once())
            await asyncio.sleep(0.005 * i)
            await sql(sink_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                f"WHERE application_name = '{app}'")
            with contextlib.suppress(Exception):
                await task
        await work.settle()
        written.update(await capture(redis, ledger))
        await make_syncer(redis, ledger, pg, "pg", batch_size=1000).run_once()
        assert await stream_backlog(redis, ledger) == 0
        await assert_every_entry_once(sink_url, redis, ledger, written, complete=True)
        await assert_sql_matches_redis(ledger, pg)
    finally:
        await pg.close()


# -- `quotagate sync` killed at random points ---------------------------------------------
async def test_sync_process_killed_at_random_points(
        redis_server: Any, redis: Any, ledger: Ledger, sink: Sink, sink_url: str,
        tmp_path: Path) -> None:
    """`quotagate sync` processes SIGKILLed at random moments while traffic flows, each
    followed by another (a new pid: a new consumer that claims what the dead one held):
    SQL ends with every entry once."""
    await setup_orgs(ledger)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env.update(QUOTAGATE_REDIS_URL=redis_server.url, QUOTAGATE_DATABASE_URL=sink_url,
               QUOTAGATE_SHARDS="64", QUOTAGATE_DATA_DIR=str(tmp_path / "data"),
               QUOTAGATE_SYNC_BATCH_SIZE="25", QUOTAGATE_SYNC_POLL_MS="5",
               QUOTAGATE_SYNC_CLAIM_IDLE_MS="1")
    rng = random.Random(17)
    work = Workload(ledger, seed=19)
    written: dict[str, dict[str, bytes]] = {}
    for _ in range(3):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "quotagate", "sync", env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + rng.uniform(0.6, 1.2)
            while time.monotonic() < deadline:
                await work.run(15)
                written.update(await capture(redis, ledger))
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
    await work.settle()
    written.update(await capture(redis, ledger))
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quotagate", "sync",
                                                    "--once"], env=env, capture_output=True,
                                   text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert await stream_backlog(redis, ledger) == 0
    await assert_every_entry_once(sink_url, redis, ledger, written)
    await assert_sql_matches_redis(ledger, sink)
    assert len(written) > 100  # a non-trivial run
