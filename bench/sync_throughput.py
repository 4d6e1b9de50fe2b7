"""Syncer throughput into SQL, in ledger entries per second.

Starts a private redis-server, fills the ledger streams with N real entries (reserve +
commit through the Lua scripts, across many orgs so every shard is used), then times
`Syncer.run_once()` copying them all into the database (entries, usage totals and state
snapshots, batches of `--batch` entries per shard).

    .venv/bin/python bench/sync_throughput.py                        # PostgreSQL, test DB
    .venv/bin/python bench/sync_throughput.py --database-url sqlite:////tmp/qg-bench.db

PostgreSQL: each run uses a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import psycopg
import redis.asyncio as aioredis

from quotagate import catalog
from quotagate.clock import SystemClock
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import open_sink
from quotagate.sync.syncer import Syncer, SyncOptions
from redis_server import RedisServer


async def fill(ledger: Ledger, pairs: int, orgs: int, concurrency: int = 64) -> None:
    await ledger.upsert_plan("bench", [Allowance("message_tokens", 10**12)])
    for o in range(orgs):
        await ledger.upsert_org(f"org{o}", "bench")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            r = await ledger.reserve(Subject(f"org{i % orgs}"),
                                     [Charge("message_tokens", 100)], idempotency_key=f"b{i}")
            assert r.reservation_id, r
            await ledger.commit(r.reservation_id, [Charge("message_tokens", 90)])

    await asyncio.gather(*(one(i) for i in range(pairs)))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--orgs", type=int, default=500)
    p.add_argument("--batch", type=int, default=1000, help="entries per shard per read")
    args = p.parse_args()

    url, schema = args.database_url, ""
    if url.startswith("postgres"):
        schema = f"qgbench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"CREATE SCHEMA {schema}")
        url += ("&" if "?" in url else "?") + "options=" + quote(f"-csearch_path={schema}")
    srv = RedisServer().start()
    redis = aioredis.Redis.from_url(srv.url)
    sink = open_sink(url)
    try:
        cat = catalog.load(None)
        keys = Keys(256)
        ledger = Ledger(redis, cat.catalog, SystemClock(), keys)
        t = time.perf_counter()
        await fill(ledger, args.entries // 2, args.orgs)
        fill_s = time.perf_counter() - t
        await sink.migrate()
        syncer = Syncer(redis, keys, sink, cat.catalog,
                        SyncOptions(batch_size=args.batch, consumer="bench"))
        await syncer.ensure_groups()
        t = time.perf_counter()
        counts = await syncer.run_once()
        sync_s = time.perf_counter() - t
        kind = url.split(":")[0]
        print(f"filled {counts.read} entries in {fill_s:.1f}s; synced into {kind} in "
              f"{sync_s:.2f}s over {counts.batches} batches ({counts.snapshots} snapshots): "
              f"{counts.inserted / sync_s:,.0f} entries/s")
    finally:
        await sink.close()
        await redis.aclose()
        srv.close()
        if schema:
            with psycopg.connect(args.database_url, autocommit=True) as c:
                c.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    asyncio.run(main())
