"""SQLite sink: the stdlib driver, one connection used from worker threads under a lock."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from quotagate.sync import sink as sk

T = TypeVar("T")

_INSERT = (f"INSERT INTO ledger_entries ({', '.join(sk.ENTRY_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(sk.ENTRY_COLUMNS))}) "
           "ON CONFLICT (entry_id) DO NOTHING")
_TOTALS = (f"INSERT INTO usage_totals ({', '.join(sk.TOTAL_COLUMNS)}, amount) "
           f"VALUES ({', '.join('?' * (len(sk.TOTAL_COLUMNS) + 1))}) "
           f"ON CONFLICT ({', '.join(sk.TOTAL_COLUMNS)}) "
           "DO UPDATE SET amount = usage_totals.amount + excluded.amount")
_PERIOD_TOTALS = (f"INSERT INTO period_totals ({', '.join(sk.PERIOD_COLUMNS)}, amount) "
                  f"VALUES ({', '.join('?' * (len(sk.PERIOD_COLUMNS) + 1))}) "
                  f"ON CONFLICT ({', '.join(sk.PERIOD_COLUMNS)}) "
                  "DO UPDATE SET amount = period_totals.amount + excluded.amount")
_SNAP = ("INSERT INTO state_snapshots (redis_key, org, kind, data, updated_at) "
         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (redis_key) DO UPDATE SET org = excluded.org, "
         "kind = excluded.kind, data = excluded.data, updated_at = excluded.updated_at "
         # a syncer slow to commit must not put back an older copy over a newer one
         "WHERE excluded.updated_at >= state_snapshots.updated_at")


def _chunks(items: Sequence[str], n: int = 500) -> list[Sequence[str]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _with_periods(conn: sqlite3.Connection, entries: Sequence[sk.Entry],
                  snapshots: Sequence[sk.Snapshot]) -> list[sk.Entry]:
    """sk.with_periods, with the anchors and commits the batch lacks read from SQL."""
    anchors = sk.anchors_of(snapshots)
    missing = sorted({e.org for e in entries if e.org and e.org not in anchors})
    for part in _chunks(missing):
        for org, data in conn.execute(
                "SELECT org, data FROM state_snapshots WHERE kind = 'cfg' AND org IN "
                f"({', '.join('?' * len(part))})", part):
            anchors[org] = sk.anchor_of(json.loads(data))
    commits: dict[tuple[str, str], str] = {}
    for part in _chunks(sk.refund_rids(entries)):
        for rid, meter, period in conn.execute(
                "SELECT rid, meter, period FROM ledger_entries WHERE type = 'commit' AND rid IN "
                f"({', '.join('?' * len(part))})", part):
            commits[(rid, meter)] = period
    return sk.with_periods(entries, anchors, commits)


class SqliteSink:
    def __init__(self, url: str) -> None:
        self.url = url
        # sqlite:///relative/path, sqlite:////absolute/path (as SQLAlchemy reads them)
        self.path = Path(url.removeprefix("sqlite:///"))
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                conn = self._connect()
                try:
                    return fn(conn)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

        return await asyncio.to_thread(call)

    async def migrate(self) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            conn.execute("BEGIN IMMEDIATE")  # one migrator at a time
            conn.execute(sk.SCHEMA_MIGRATIONS)
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            applied = []
            for version, stmts in sk.migrations():
                if version in done:
                    continue
                for s in stmts:
                    conn.execute(s)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)",
                             (version, int(time.time() * 1000)))
                applied.append(version)
            conn.execute("COMMIT")
            return applied

        return await self._run(run)

    async def write(self, entries: Sequence[sk.Entry], snapshots: Sequence[sk.Snapshot]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            attributed = _with_periods(conn, entries, snapshots)
            inserted = [e for e in attributed if conn.execute(_INSERT, e.row()).rowcount == 1]
            conn.executemany(_TOTALS, [(*k, v) for k, v in sk.usage_deltas(inserted).items()])
            conn.executemany(_PERIOD_TOTALS,
                             [(*k, v) for k, v in sk.period_deltas(inserted).items()])
            conn.executemany(_SNAP, [s.row() for s in snapshots])
            conn.execute("COMMIT")
            return len(inserted)

        return await self._run(run)

    async def usage(self, q: sk.UsageQuery) -> list[sk.UsageRow]:
        sql, params = sk.usage_sql(q, "?")
        return await self._run(lambda c: sk.usage_rows(q, c.execute(sql, params).fetchall()))

    async def snapshots(self) -> list[sk.Snapshot]:
        rows = await self._run(lambda c: c.execute(
            "SELECT redis_key, org, kind, data, updated_at FROM state_snapshots "
            "ORDER BY redis_key").fetchall())
        return [sk.snapshot_of(r) for r in rows]

    async def prune(self, before_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(sk.PRUNE_SQL.format(ph="?"), (before_ms, sk.HELD_PATTERN)).rowcount

        return await self._run(run)

    async def close(self) -> None:
        def run() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(run)
