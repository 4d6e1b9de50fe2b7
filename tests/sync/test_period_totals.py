"""Usage per billing period: real scripts -> real syncer -> SQL (SQLite and PostgreSQL) ->
ListUsage grouped by `period`, for an org whose periods start on the 15th."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import DAY, Grpc, ms
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.ledger.model import Allowance, Charge, HoldState, Subject
from quotagate.ledger.store import Ledger
from quotagate.settings import Settings
from quotagate.sync import sink as sk
from quotagate.sync.syncer import Syncer, SyncOptions
from quotagate.v1 import admin_pb2

from .conftest import app_syncer

ORG = "period:{15} org"
SEATS = ("s1", "s 2")
OCT, NOV = "2026-10-15", "2026-11-15"  # the periods around T0 (2026-11-10) for anchor 15
BOUNDARY = ms(2026, 11, 15)
HOUR = 3_600_000

#: (seat, period, day, meter, ±amount, at_ms), as Commit and Refund answered
Record = tuple[str, str, str, str, int, int]


def _day(at: int) -> str:
    return dt.datetime.fromtimestamp(at / 1000, dt.UTC).strftime("%Y-%m-%d")


class Scenario:
    def __init__(self, s: Grpc, clock: ManualClock) -> None:
        assert s.app.ledger is not None
        self.led: Ledger = s.app.ledger
        self.clock = clock
        self.records: list[Record] = []
        self.n = 0

    def at(self, when: int) -> None:
        self.clock.advance(when - self.clock.now_ms())

    def _record(self, seat: str, period: str, meter: str, amount: int) -> None:
        now = self.clock.now_ms()
        self.records.append((seat, period, _day(now), meter, amount, now))

    async def reserve(self, seat: str, meter: str, amount: int, ttl: int = 0) -> str:
        self.n += 1
        res = await self.led.reserve(Subject(ORG, "", seat), [Charge(meter, amount)],
                                     idempotency_key=f"k{self.n}", ttl_seconds=ttl)
        assert res.granted == (Charge(meter, amount),), res
        return res.reservation_id

    async def commit(self, rid: str, seat: str, period: str, meter: str,
                     actual: int | None = None) -> None:
        c = await self.led.commit(rid, [] if actual is None else [Charge(meter, actual)])
        assert c.state == HoldState.COMMITTED
        assert actual is None or c.amounts == (Charge(meter, actual),)
        self._record(seat, period, meter, c.amounts[0].amount)

    async def spend(self, seat: str, period: str, meter: str, amount: int) -> str:
        rid = await self.reserve(seat, meter, amount)
        await self.commit(rid, seat, period, meter)
        return rid

    async def refund(self, rid: str, seat: str, period: str, meter: str, amount: int) -> None:
        r = await self.led.refund(rid, [Charge(meter, amount)], reason="test")
        assert r.amounts == (Charge(meter, amount),)
        self._record(seat, period, meter, -amount)


async def _setup(led: Ledger) -> None:
    await led.upsert_plan("p15", [Allowance("message_tokens", 1000),
                                  Allowance("call_seconds", 100),
                                  Allowance("storage_bytes", 10**6)])
    await led.upsert_org(ORG, "p15", period_anchor_day=15)
    for seat in SEATS:
        await led.upsert_seat(ORG, seat)


async def _stream(redis: Any, led: Ledger) -> list[sk.Entry]:
    """The ledger entries Redis holds now (not synced yet), every shard."""
    return [sk.entry_of(shard, sid, f) for shard in range(led.keys.shards)
            for sid, f in await redis.xrange(led.keys.ledger(shard))]


_TAKE = re.compile(r"[A-Za-z]+:(\d+):\d+")


def _by_entries(entries: list[sk.Entry]) -> list[Record]:
    """The usage records computed from the raw ledger entries, on the rule ListUsage
    documents: a charge belongs to the earliest period its takes name (id = year * 12 +
    month - 1 of the period's start), else to the period holding its time; a refund to
    the period of the charge it gives back."""
    out: list[Record] = []
    of_commit: dict[tuple[str, str], str] = {}
    for e in entries:
        f = json.loads(e.raw)
        if e.type == "commit":
            pids = [int(p) for p in _TAKE.findall(f.get("takes", "")) if int(p)]
            if pids:
                y, m = divmod(min(pids), 12)
                period = f"{y}-{m + 1:02d}-15"
            else:
                period = NOV if e.at_ms >= BOUNDARY else OCT
            of_commit[(e.rid, e.meter)] = period
            out.append((e.seat, period, e.day, e.meter, e.amount, e.at_ms))
        elif e.type == "refund":
            out.append((e.seat, of_commit[(e.rid, e.meter)], e.day, e.meter, -e.amount,
                        e.at_ms))
    return [r for r in out if r[4]]


_DIM = {"seat": 0, "period": 1, "day": 2}


def _expected(records: list[Record], group_by: list[str], start: int | None = None,
              end: int | None = None) -> dict[tuple[tuple[str, ...], str], int]:
    out: dict[tuple[tuple[str, ...], str], int] = defaultdict(int)
    for r in records:
        if (start is None or r[5] >= start) and (end is None or r[5] < end):
            out[(tuple(r[_DIM[g]] for g in group_by), r[3])] += r[4]
    return dict(out)


def _ts(at: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(at)
    return t


async def _list(s: Grpc, group_by: list[str], page_size: int = 1000, start: int | None = None,
                end: int | None = None) -> dict[tuple[tuple[str, ...], str], int]:
    got: dict[tuple[tuple[str, ...], str], int] = {}
    token = ""
    kw: dict[str, Any] = {}
    if start is not None:
        kw["start"] = _ts(start)
    if end is not None:
        kw["end"] = _ts(end)
    while True:
        resp = await s.admin.ListUsage(admin_pb2.ListUsageRequest(
            org_id=ORG, group_by=group_by, page_size=page_size, page_token=token, **kw))
        for row in resp.rows:
            key = (tuple(row.group[g] for g in group_by), row.meter)
            assert key not in got, "a row came twice"
            got[key] = row.amount
        token = resp.next_page_token
        if not token:
            return got


class _DiesBeforeAck(Syncer):
    """A syncer that stops between its SQL commit and XACK (as a killed process would):
    its batch stays pending and is delivered again."""

    async def _ack(self, ids: Any) -> None:
        raise ConnectionError("gone before XACK")


async def test_usage_by_billing_period_anchor_15(server: Grpc, redis: Any,
                                                  clock: ManualClock) -> None:
    sc = Scenario(server, clock)
    led = sc.led
    await _setup(led)
    entries: list[sk.Entry] = []

    # -- before the 15th: the period that started on 2026-10-15 -------------------------
    sc.at(ms(2026, 11, 10, 1))
    await sc.spend("s1", OCT, "message_tokens", 300)
    rid = await sc.reserve("s 2", "message_tokens", 500)
    await sc.commit(rid, "s 2", OCT, "message_tokens", 400)       # less than held
    await led.topup(ORG, "message_tokens", 2000, "buy-1")
    sc.at(ms(2026, 11, 12, 9))
    refunded_later = await sc.spend("s1", OCT, "message_tokens", 600)  # monthly, then top-up
    await sc.spend("s1", OCT, "storage_bytes", 5000)             # a gauge names no period
    entries += await _stream(redis, led)
    assert (await app_syncer(server.app).run_once()).inserted == len(entries)

    sc.at(ms(2026, 11, 14, 23))
    held = await sc.reserve("s 2", "message_tokens", 200, ttl=7200)  # from top-up, October
    sc.at(BOUNDARY - 1)
    await sc.spend("s 2", OCT, "message_tokens", 10)             # the period's last ms

    # -- from the 15th: the period that started on 2026-11-15 ---------------------------
    sc.at(BOUNDARY)
    await sc.spend("s 2", NOV, "message_tokens", 20)              # its first ms
    sc.at(BOUNDARY + HOUR // 2)
    # the October hold committed in November, above what it held (the excess is charged
    # from November's monthly tokens): all of it is October's usage
    await sc.commit(held, "s 2", OCT, "message_tokens", 350)
    await sc.refund(refunded_later, "s1", OCT, "message_tokens", 100)  # commit synced above
    sc.at(ms(2026, 11, 16, 8))
    nov = await sc.spend("s1", NOV, "message_tokens", 250)
    await sc.refund(nov, "s1", NOV, "message_tokens", 50)          # commit in the same batch
    await sc.spend("s 2", NOV, "storage_bytes", 700)
    # a late Commit of an expired hold on a dry wallet: all debt, no period in its takes
    dry = await sc.reserve("s1", "call_seconds", 100, ttl=60)
    sc.at(ms(2026, 11, 16, 9))
    await led.sweep_all()                                          # expired: released
    await sc.spend("s 2", NOV, "call_seconds", 100)                # the last seconds
    await sc.commit(dry, "s1", NOV, "call_seconds", 30)
    batch = await _stream(redis, led)
    entries += batch
    assert any(json.loads(e.raw).get("takes") == "D:0:30" for e in batch)

    # the batch is delivered twice: first by a syncer gone before XACK, then again
    with pytest.raises(ConnectionError):
        await _DiesBeforeAck(server.app.redis, led.keys, server.app.sink,
                             led.catalog, SyncOptions(consumer="test")).run_once()
    again = await app_syncer(server.app).run_once()
    assert again.read == len(batch) and again.inserted == 0

    # what the test expects = what the raw ledger entries say
    assert sorted(_by_entries(entries)) == sorted(sc.records)
    records = sc.records
    assert {r[1] for r in records} == {OCT, NOV}

    for group_by in (["period"], ["period", "seat"], ["seat", "period"], ["period", "day"],
                     [], ["seat"], ["day"]):
        assert await _list(server, group_by) == _expected(records, group_by), group_by
    assert await _list(server, ["period"]) == {
        ((OCT,), "message_tokens"): 300 + 400 + 600 + 10 + 350 - 100,
        ((NOV,), "message_tokens"): 20 + 250 - 50,
        ((OCT,), "storage_bytes"): 5000, ((NOV,), "storage_bytes"): 700,
        ((NOV,), "call_seconds"): 130}
    # time ranges select entries by their time, then group them by their period:
    # day-aligned (the per-period totals) and not (the entries themselves)
    for start, end in ((BOUNDARY, None), (BOUNDARY, BOUNDARY + DAY), (None, BOUNDARY),
                       (BOUNDARY - HOUR, BOUNDARY + HOUR), (BOUNDARY + 1, None)):
        for group_by in (["period"], ["seat", "period"]):
            got = await _list(server, group_by, start=start, end=end)
            assert got == _expected(records, group_by, start, end), (group_by, start, end)
    assert await _list(server, ["period"], start=BOUNDARY, end=BOUNDARY + DAY) == {
        ((OCT,), "message_tokens"): 350 - 100, ((NOV,), "message_tokens"): 20}
    # pages of one row cover every row once
    full = await _list(server, ["period", "seat", "day"])
    assert await _list(server, ["period", "seat", "day"], page_size=1) == full
    assert len(full) > 8


def _connect(url: str) -> Any:
    if url.startswith("sqlite:///"):
        return sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    return psycopg.connect(url, autocommit=True)


def _old_schema(url: str) -> None:
    """The database as the migrations before 0003 left it."""
    with _connect(url) as db:
        db.execute(sk.SCHEMA_MIGRATIONS)
        for version, stmts in sk.migrations():
            if version >= "0003":
                break
            for s in stmts:
                db.execute(s)
            db.execute(f"INSERT INTO schema_migrations VALUES ('{version}', 0)")


def _old_write(url: str, entries: list[sk.Entry]) -> None:
    """What the sink wrote before 0003: the entries without a period, usage_totals."""
    cols = sk.ENTRY_COLUMNS[:-1]
    ph = "?" if url.startswith("sqlite") else "%s"
    with _connect(url) as db:
        for e in entries:
            db.execute(f"INSERT INTO ledger_entries ({', '.join(cols)}) VALUES "
                       f"({', '.join([ph] * len(cols))})", e.row()[:-1])
        for k, v in sk.usage_deltas(entries).items():
            db.execute(f"INSERT INTO usage_totals ({', '.join(sk.TOTAL_COLUMNS)}, amount) "
                       f"VALUES ({', '.join([ph] * (len(k) + 1))})", (*k, v))


@pytest.fixture
async def old_db(sink_url: str, redis: Any, ledger: Ledger, clock: ManualClock
                 ) -> list[sk.Entry]:
    """A database of the migrations before 0003 holding the entries of some usage, as the
    old version synced them (not acknowledged yet: they are delivered again)."""
    _old_schema(sink_url)
    await _setup(ledger)
    for i, (seat, amount) in enumerate((("s1", 300), ("s 2", 40))):
        res = await ledger.reserve(Subject(ORG, "", seat), [Charge("message_tokens", amount)],
                                   idempotency_key=f"old{i}")
        await ledger.commit(res.reservation_id)
    old = await _stream(redis, ledger)
    _old_write(sink_url, old)
    return old


@pytest.fixture
async def old_server(old_db: list[sk.Entry], redis_server: Any, redis: Any,
                     clock: ManualClock, sink_url: str) -> AsyncIterator[Grpc]:
    """The real server started on the old database (it migrates it at start)."""
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, database_url=sink_url,
                        sync_in_process=False, metrics_listen="127.0.0.1:0")
    app = await App(settings, clock=clock).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Grpc(app, channel)
    await channel.close()
    await app.stop()


async def test_old_database_upgrades_old_rows_get_empty_period(
        old_db: list[sk.Entry], old_server: Grpc, redis: Any, sink_url: str,
        clock: ManualClock) -> None:
    server = old_server
    sc = Scenario(server, clock)
    led = sc.led
    old = old_db
    with _connect(sink_url) as db:
        versions = [r[0] for r in db.execute(
            "SELECT version FROM schema_migrations ORDER BY version").fetchall()]
    assert len(versions) == len(sk.migrations()) and versions[-1].startswith("0003")

    rid = next(e.rid for e in old if e.type == "commit" and e.seat == "s 2")
    sc.at(BOUNDARY + HOUR)
    await sc.refund(rid, "s 2", "", "message_tokens", 15)  # its commit has period ''
    await sc.spend("s1", NOV, "message_tokens", 70)
    new = await _stream(redis, led)
    counts = await app_syncer(server.app).run_once()  # re-delivers the old rows too
    assert counts.read == len(new) and counts.inserted == len(new) - len(old) >= 3
    assert await server.app.sink.migrate() == []  # type: ignore[union-attr]

    with _connect(sink_url) as db:
        periods = dict(db.execute("SELECT entry_id, period FROM ledger_entries").fetchall())
    assert {periods[e.entry_id] for e in old} == {""}
    assert sorted(set(periods.values())) == ["", NOV]

    want = {(("",), "message_tokens"): 300 + 40 - 15, ((NOV,), "message_tokens"): 70}
    assert await _list(server, ["period"]) == want
    assert await _list(server, ["period"], start=ms(2026, 11, 1)) == want  # totals
    assert await _list(server, ["period"], start=ms(2026, 11, 1) + 1) == want  # entries
    assert await _list(server, ["seat", "period"]) == {
        (("s1", ""), "message_tokens"): 300, (("s 2", ""), "message_tokens"): 25,
        (("s1", NOV), "message_tokens"): 70}
    assert await _list(server, []) == {((), "message_tokens"): 300 + 40 - 15 + 70}


def _periods(sink_url: str) -> dict[str, str]:
    with _connect(sink_url) as db:
        rows = db.execute("SELECT type, period FROM ledger_entries WHERE type IN "
                          "('reserve', 'commit')").fetchall()
    return dict(rows)


SPEND = ("reserve", "commit")


async def _spend_unsynced(redis: Any, ledger: Ledger, key: str) -> list[sk.Entry]:
    """A Reserve+Commit of 5 tokens, and its ledger entries taken out of Redis (what the
    syncer would do), not written to SQL yet."""
    res = await ledger.reserve(Subject(ORG), [Charge("message_tokens", 5)],
                               idempotency_key=key)
    await ledger.commit(res.reservation_id)
    entries = await _stream(redis, ledger)
    for shard in range(ledger.keys.shards):
        await redis.delete(ledger.keys.ledger(shard))
    return entries


def _as_older_build(e: sk.Entry) -> sk.Entry:
    """The entry as builds before the anchor day was in spend entries wrote it."""
    if e.type not in SPEND:
        return e
    f = json.loads(e.raw)
    values = [f.get(name, "") for name in sk.SPEND_FIELDS[:-1]]
    return sk.entry_of(e.shard, e.stream_id, {"p": "\n".join(values)})


async def test_anchor_from_stored_configuration_else_month_label(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: sk.Sink, sink_url: str) -> None:
    """Entries without their anchor day (written by older builds) in a batch without the
    org's configuration (no snapshot of it) take the anchor day from the last one stored;
    with none stored at all, the period's month is the label."""
    await _setup(ledger)
    clock.advance(ms(2026, 11, 12) - clock.now_ms())
    entries = await _spend_unsynced(redis, ledger, "a")
    assert {e.anchor for e in entries if e.type in SPEND} == {15}
    assert await sink.write([_as_older_build(e) for e in entries], []) > 0
    assert _periods(sink_url) == {"reserve": "2026-10", "commit": "2026-10"}
    with _connect(sink_url) as db:
        db.execute("DELETE FROM ledger_entries")
    cfg = await redis.hgetall(ledger.keys.cfg(ORG))
    await sink.write([], [sk.Snapshot(ledger.keys.cfg(ORG), ORG, "cfg",
                                      {k.decode(): v.decode() for k, v in cfg.items()}, 1)])
    entries = await _spend_unsynced(redis, ledger, "b")
    assert await sink.write([_as_older_build(e) for e in entries], []) > 0
    assert _periods(sink_url) == {"reserve": OCT, "commit": OCT}


async def test_anchor_change_keeps_pending_entries_period(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: sk.Sink, sink_url: str) -> None:
    """Spend entries carry the anchor day they were written with: an org whose anchor day
    changes while its entries wait for SQL (an SQL outage) still gets them in the period
    they were charged in, not one relabelled with the new day; with no configuration
    stored at all as well."""
    await _setup(ledger)
    clock.advance(ms(2026, 11, 12) - clock.now_ms())
    entries = await _spend_unsynced(redis, ledger, "a")  # period 2026-10-15 .. 11-15
    await ledger.upsert_org(ORG, "p15", period_anchor_day=1)
    cfg = await redis.hgetall(ledger.keys.cfg(ORG))
    assert cfg[b"anchor"] == b"1"
    snap = sk.Snapshot(ledger.keys.cfg(ORG), ORG, "cfg",
                       {k.decode(): v.decode() for k, v in cfg.items()}, 1)
    assert await sink.write(entries, [snap]) > 0
    assert _periods(sink_url) == {"reserve": OCT, "commit": OCT}
    # what is spent after the change is labelled with the new day
    with _connect(sink_url) as db:
        db.execute("DELETE FROM ledger_entries")
    entries = await _spend_unsynced(redis, ledger, "b")
    assert {e.anchor for e in entries if e.type in SPEND} == {1}
    assert await sink.write(entries, []) > 0
    assert _periods(sink_url) == {"reserve": "2026-11-01", "commit": "2026-11-01"}
