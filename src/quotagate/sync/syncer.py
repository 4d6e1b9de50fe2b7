"""The syncer: copies every shard's ledger stream to SQL, at least once, counted once.

Per round, for every shard (one pipelined Redis round trip for all shards):

1. XREADGROUP (consumer group `quotagate-sync`): our own pending entries first (a batch
   whose SQL write failed is retried), entries pending at dead consumers for longer than
   `claim_idle_ms` (XAUTOCLAIM), then new ones;
2. snapshot the Redis hashes the batch touched (org config, balances of every catalog
   meter, purchases, the batch's holds, the org's plan) with HGETALL;
3. ONE SQL transaction: insert the entries (`ON CONFLICT DO NOTHING` on
   `<shard>-<stream id>`), add the usage of those actually inserted to `usage_totals`,
   upsert the snapshots;
4. only after the commit: XACK, then XDEL the acknowledged entries (the stream holds only
   what SQL has not got yet, so its length is the lag).

A crash between 3 and 4 re-delivers the batch; step 3 then inserts nothing twice.

Test hook: with `QUOTAGATE_FAULT_EXIT_AFTER_COMMIT=1` in the environment the process
SIGKILLs itself right after the SQL commit, before XACK (the kill test of
tests/sync). Never set it in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors

from quotagate.ledger.keys import Keys, unescape
from quotagate.ledger.model import Catalog
from quotagate.ledger.store import LedgerOptions
from quotagate.sync.restore import balance_text
from quotagate.sync.sink import Entry, Sink, Snapshot, entry_of
from quotagate.tasks import raise_if_cancelled

log = logging.getLogger("quotagate.sync")

GROUP = "quotagate-sync"
FAULT_ENV = "QUOTAGATE_FAULT_EXIT_AFTER_COMMIT"
#: how often a process without a syncer of its own reads the lag from Redis (LagMonitor)
LAG_MONITOR_S = 2.0


@dataclass(frozen=True)
class SyncOptions:
    batch_size: int = 1000        # entries per shard per read
    poll_ms: int = 200            # sleep when nothing was read
    claim_idle_ms: int = 30_000   # claim entries pending this long at another consumer
    consumer: str = ""            # empty: <hostname>-<pid>
    housekeeping_s: float = 3600  # how often housekeeping() runs inside run()
    retain_ms: int = LedgerOptions.retain_ms  # Redis keeps resolved holds this long

    @classmethod
    def from_settings(cls, s: Any) -> SyncOptions:
        return cls(batch_size=s.sync_batch_size, poll_ms=s.sync_poll_ms,
                   claim_idle_ms=s.sync_claim_idle_ms, consumer=s.sync_consumer,
                   retain_ms=s.retention_seconds * 1000)


@dataclass
class SyncCounts:
    read: int = 0       # entries read from the streams (incl. re-deliveries)
    inserted: int = 0   # new rows in ledger_entries
    duplicates: int = 0  # re-delivered entries SQL already had
    claimed: int = 0    # taken over from dead consumers
    batches: int = 0
    snapshots: int = 0

    def add(self, other: SyncCounts) -> None:
        for f in ("read", "inserted", "duplicates", "claimed", "batches", "snapshots"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class _Batch:
    # shard -> stream ids to ack
    ids: dict[int, list[str]] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    claimed: int = 0

    def add(self, shard: int, items: Iterable[Any]) -> None:
        for sid, fields in items:
            s = sid.decode() if isinstance(sid, bytes) else str(sid)
            self.ids.setdefault(shard, []).append(s)
            if fields:  # an entry deleted while pending comes back without fields
                e = entry_of(shard, s, fields)
                if e.type == "invalid":  # stored with no usage, never retried forever
                    log.warning("ledger entry %s is malformed, stored as invalid: %s",
                                e.entry_id, e.raw)
                self.entries.append(e)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _is(e: BaseException, code: str) -> bool:
    return isinstance(e, redis_errors.ResponseError) and str(e).startswith(code)


class Syncer:
    def __init__(self, redis: Any, keys: Keys, sink: Sink, catalog: Catalog,
                 options: SyncOptions | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.sink = sink
        self.catalog = catalog
        self.opt = options or SyncOptions()
        self.consumer = self.opt.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._streams = [keys.ledger(s) for s in range(keys.shards)]
        self._groups_ready = False
        self._migrated = False
        self._lag: dict[int, tuple[int, float]] = {}
        self.total = SyncCounts()

    # -- Redis side ---------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        """Create the consumer group on every shard's stream (MKSTREAM, from id 0)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self._streams:
            pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
        for r in await pipe.execute(raise_on_error=False):
            if isinstance(r, BaseException) and not _is(r, "BUSYGROUP"):
                raise r
        self._groups_ready = True

    async def _read(self, start: str) -> _Batch:
        """One XREADGROUP per shard, pipelined; `start` '>' new, '0' our pending."""
        if not self._groups_ready:
            await self.ensure_groups()
        pipe = self.redis.pipeline(transaction=False)
        for key in self._streams:
            pipe.xreadgroup(GROUP, self.consumer, {key: start}, count=self.opt.batch_size)
        replies = await pipe.execute(raise_on_error=False)
        batch = _Batch()
        lost = False
        for shard, r in enumerate(replies):
            if isinstance(r, BaseException):
                if _is(r, "NOGROUP"):  # the stream vanished (Redis lost data, FLUSHALL)
                    lost = True
                    continue
                raise r
            for _key, items in r or ():
                batch.add(shard, items)
        if lost:
            log.warning("ledger consumer group missing on some shards: recreating it")
            self._groups_ready = False
        return batch

    async def _claim(self) -> _Batch:
        """Entries pending longer than claim_idle_ms at other (dead) consumers."""
        if not self._groups_ready:
            await self.ensure_groups()
        pipe = self.redis.pipeline(transaction=False)
        for key in self._streams:
            pipe.xautoclaim(key, GROUP, self.consumer, self.opt.claim_idle_ms,
                            start_id="0-0", count=self.opt.batch_size)
        batch = _Batch()
        for shard, r in enumerate(await pipe.execute(raise_on_error=False)):
            if isinstance(r, BaseException):
                if _is(r, "NOGROUP"):
                    self._groups_ready = False
                    continue
                raise r
            batch.add(shard, r[1])
            for sid in (r[2] if len(r) > 2 else ()):  # deleted while pending: just ack
                batch.ids.setdefault(shard, []).append(_text(sid))
        batch.claimed = sum(len(v) for v in batch.ids.values())
        return batch

    async def _snapshots(self, entries: Sequence[Entry]) -> list[Snapshot]:
        """HGETALL of every hash the entries touched, in two pipelined round trips."""
        k = self.keys
        orgs = sorted({e.org for e in entries if e.org})
        rids = sorted({e.rid for e in entries if e.rid})
        wanted: list[tuple[str, str, str]] = []  # (key, org, kind)
        for org in orgs:
            wanted.append((k.cfg(org), org, "cfg"))
            wanted.extend((k.bal(org, m), org, "bal") for m in self.catalog.meters)
            wanted.append((k.purchases(org), org, "pur"))
        org_of_rid = {e.rid: e.org for e in entries if e.rid}
        for rid in rids:
            try:
                wanted.append((k.hold(rid), org_of_rid[rid], "hold"))
            except ValueError:
                continue
        if not wanted:
            return []
        now = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for key, _, _ in wanted:
            pipe.hgetall(key)
        out: list[Snapshot] = []
        plans: dict[str, str] = {}
        for (key, org, kind), h in zip(wanted, await pipe.execute(), strict=True):
            # wallets are MessagePack in Redis, JSON arrays in a snapshot
            data = balance_text(h or {}) if kind == "bal" else \
                {_text(f): _text(v) for f, v in (h or {}).items()}
            if not data:  # gone (expired hold) or never existed: keep the last copy
                continue
            out.append(Snapshot(key, org, kind, data, now))
            if kind == "cfg" and data.get("plan"):
                plans[unescape(data["plan"])] = org  # stored escaped
        if plans:
            pipe = self.redis.pipeline(transaction=False)
            names = sorted(plans)
            for name in names:
                pipe.hgetall(k.plan(name))
            for name, h in zip(names, await pipe.execute(), strict=True):
                data = {_text(f): _text(v) for f, v in (h or {}).items()}
                if data:
                    out.append(Snapshot(k.plan(name), "", "plan", data, now))
        return out

    async def _ack(self, ids: Mapping[int, list[str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for shard, sids in ids.items():
            if sids:
                pipe.xack(self._streams[shard], GROUP, *sids)
                pipe.xdel(self._streams[shard], *sids)
        await pipe.execute()

    # -- one batch ----------------------------------------------------------------------
    async def _process(self, batch: _Batch) -> SyncCounts:
        if not batch.ids:
            return SyncCounts()
        if not self._migrated:
            await self.sink.migrate()
            self._migrated = True
        uniq = list({e.entry_id: e for e in batch.entries}.values())
        snaps = await self._snapshots(uniq)
        inserted = await self.sink.write(uniq, snaps)
        if os.environ.get(FAULT_ENV) == "1":  # test hook, see the module doc
            os.kill(os.getpid(), signal.SIGKILL)
        await self._ack(batch.ids)
        return SyncCounts(read=len(uniq), inserted=inserted, duplicates=len(uniq) - inserted,
                          claimed=batch.claimed, batches=1, snapshots=len(snaps))

    async def run_once(self, max_rounds: int | None = None) -> SyncCounts:
        """Copy everything available now (own pending, claimable, new) and return counts.
        A failing SQL write raises; its entries stay pending and are retried next time.
        `max_rounds` bounds the reads of new entries (None: until the streams are dry)."""
        counts = SyncCounts()
        while True:  # ours, delivered before but not acknowledged (a failed write)
            c = await self._process(await self._read("0"))
            counts.add(c)
            if not c.batches:
                break
        counts.add(await self._process(await self._claim()))
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            rounds += 1
            c = await self._process(await self._read(">"))
            counts.add(c)
            if not c.batches:
                break
        self.total.add(counts)
        return counts

    async def run(self) -> None:
        """Loop until cancelled; back off (up to 5 s) while Redis or SQL fail."""
        backoff = 0.0
        last_lag = 0.0
        last_housekeeping = 0.0
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():  # a library swallowed our cancellation
                raise asyncio.CancelledError
            read = 0
            try:
                read = (await self.run_once(max_rounds=20)).read
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                backoff = min(max(backoff * 2, 0.2), 5.0)
                log.warning("sync failed (retrying in %.1fs): %s", backoff, e)
            if time.monotonic() - last_lag >= 1.0 or backoff:
                last_lag = time.monotonic()
                try:
                    await self.refresh_lag()
                except Exception as e:
                    log.debug("lag not measured: %s", e)
            if not backoff and time.monotonic() - last_housekeeping >= self.opt.housekeeping_s:
                last_housekeeping = time.monotonic()
                try:
                    await self.housekeeping()
                except Exception as e:
                    log.warning("housekeeping failed (next in %.0fs): %s",
                                self.opt.housekeeping_s, e)
            if backoff:
                await asyncio.sleep(backoff)
            elif not read:
                await asyncio.sleep(self.opt.poll_ms / 1000)

    # -- housekeeping -------------------------------------------------------------------
    async def housekeeping(self, now_ms: int | None = None,
                           consumer_idle_ms: int | None = None) -> tuple[int, int]:
        """What would otherwise grow forever: delete the SQL snapshots of holds resolved
        longer than the retention ago (Redis has dropped them as well), and the group's
        consumers that hold nothing and have been idle longer than `consumer_idle_ms`
        (default: the housekeeping interval) — one per restarted syncer process, on
        every shard. Deleting a consumer with nothing pending loses nothing; a live one
        is simply recreated by its next read. Returns (snapshots, consumers) deleted."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        snaps = await self.sink.prune(now - self.opt.retain_ms)
        idle = int(self.opt.housekeeping_s * 1000) if consumer_idle_ms is None \
            else consumer_idle_ms
        pipe = self.redis.pipeline(transaction=False)
        for key in self._streams:
            pipe.xinfo_consumers(key, GROUP)
        dead: list[tuple[str, str]] = []
        for key, consumers in zip(self._streams, await pipe.execute(raise_on_error=False),
                                  strict=True):
            if isinstance(consumers, BaseException):
                continue  # no group yet on this shard
            for c in consumers:
                name = _text(c["name"])
                if name != self.consumer and int(c["pending"]) == 0 \
                        and int(c["idle"]) > idle:
                    dead.append((key, name))
        if dead:
            pipe = self.redis.pipeline(transaction=False)
            for key, name in dead:
                pipe.xgroup_delconsumer(key, GROUP, name)
            await pipe.execute(raise_on_error=False)
        if snaps or dead:
            log.info("housekeeping: pruned %d hold snapshots, deleted %d idle consumers",
                     snaps, len(dead))
        return snaps, len(dead)

    # -- lag ----------------------------------------------------------------------------
    async def refresh_lag(self) -> dict[int, tuple[int, float]]:
        """Measure, per shard, entries not yet in SQL and the age (s) of the oldest."""
        self._lag = await measure_lag(self.redis, self._streams)
        return self._lag

    def lag(self) -> dict[int, tuple[int, float]]:
        """Last measured lag per shard: (entries waiting, seconds behind). For health and
        the `quotagate.sync.lag.*` gauges; refreshed by `run()` about once a second."""
        return dict(self._lag)


async def measure_lag(redis: Any, streams: Sequence[str]) -> dict[int, tuple[int, float]]:
    """Per shard: entries its ledger stream still holds (what SQL has not got: the
    syncer deletes what it stored) and the age in seconds of the oldest. One pipelined
    round trip; a shard whose reply failed is left out."""
    pipe = redis.pipeline(transaction=False)
    for key in streams:
        pipe.xlen(key)
        pipe.xrange(key, "-", "+", count=1)
    replies = await pipe.execute(raise_on_error=False)
    now = time.time() * 1000
    lag: dict[int, tuple[int, float]] = {}
    for shard in range(len(streams)):
        n, first = replies[2 * shard], replies[2 * shard + 1]
        if isinstance(n, BaseException) or isinstance(first, BaseException):
            continue
        age = 0.0
        if n and first:
            age = max(0.0, (now - int(_text(first[0][0]).split("-")[0])) / 1000)
        lag[shard] = (int(n), age)
    return lag


class LagMonitor:
    """The sync lag, read from Redis by a process that runs no syncer of its own (a
    `serve` worker beside `quotagate sync`, or a worker other than the one running the
    in-process syncer): the same figures, since the streams are the lag, for the Sync
    health service and the lag gauges of every process."""

    def __init__(self, redis: Any, keys: Keys, interval_s: float = LAG_MONITOR_S) -> None:
        self.redis = redis
        self.interval_s = interval_s
        self._streams = [keys.ledger(s) for s in range(keys.shards)]
        self._lag: dict[int, tuple[int, float]] = {}

    async def refresh(self) -> dict[int, tuple[int, float]]:
        self._lag = await measure_lag(self.redis, self._streams)
        return self._lag

    def lag(self) -> dict[int, tuple[int, float]]:
        return dict(self._lag)

    async def run(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: health says so on its own
                log.debug("lag not measured: %s", e)
            await asyncio.sleep(self.interval_s)


async def main(settings: Any, once: bool = False) -> int:
    """`quotagate sync`: the syncer as its own process."""
    from quotagate import catalog as catalog_mod
    from quotagate import telemetry
    from quotagate.app import App
    from quotagate.sync.sink import default_url, open_sink

    cat = catalog_mod.load(settings.catalog)
    if not settings.redis_url:
        log.error("quotagate sync needs QUOTAGATE_REDIS_URL (the embedded Redis belongs "
                  "to `quotagate serve`, whose in-process syncer covers it)")
        return 2
    redis = App(settings).redis_client(settings.redis_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sink = open_sink(default_url(settings.database_url, settings.data_dir))
    syncer = Syncer(redis, Keys(settings.shards), sink, cat.catalog,
                    SyncOptions.from_settings(settings))
    metrics = None
    try:
        if once:
            c = await syncer.run_once()
            log.info("synced %d entries (%d new)", c.read, c.inserted)
        else:
            # its own /metrics (QUOTAGATE_METRICS_LISTEN): the lag gauges
            telemetry.watch_sync(syncer)
            metrics = telemetry.start_metrics_server(settings.metrics_listen)
            if metrics is not None:
                log.info("metrics on %s", settings.metrics_listen)
            await syncer.run()
    finally:
        if metrics is not None:
            metrics.stop()
            telemetry.unwatch_sync(syncer)
        await sink.close()
        await redis.aclose()
    return 0
