"""PostgreSQL sink: psycopg 3 async. A batch is one transaction: the entries and the
snapshots are COPYed into per-connection staging tables, then moved with one
`INSERT … SELECT … ON CONFLICT` each (entries: DO NOTHING RETURNING, so only those actually
inserted reach usage_totals and period_totals), so a batch of thousands of entries costs a
handful of round trips. One connection writes, another reads (ListUsage), so a
report never waits behind, or joins, a sync transaction. Both reconnect after a failure."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from quotagate.sync import sink as sk

_ECOLS = ", ".join(sk.ENTRY_COLUMNS)
#: per-connection staging tables, emptied at each commit; COPY fills them
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS qg_entries_in (LIKE ledger_entries) "
          "ON COMMIT DELETE ROWS",
          "CREATE TEMP TABLE IF NOT EXISTS qg_snapshots_in (LIKE state_snapshots) "
          "ON COMMIT DELETE ROWS")
_INSERT = (f"INSERT INTO ledger_entries ({_ECOLS}) SELECT {_ECOLS} FROM qg_entries_in "
           "ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id")
_TOTALS = (f"INSERT INTO usage_totals ({', '.join(sk.TOTAL_COLUMNS)}, amount) "
           "SELECT * FROM unnest(" + ", ".join(["%s::text[]"] * len(sk.TOTAL_COLUMNS))
           + ", %s::bigint[]) "
           f"ON CONFLICT ({', '.join(sk.TOTAL_COLUMNS)}) "
           "DO UPDATE SET amount = usage_totals.amount + EXCLUDED.amount")
_PERIOD_TOTALS = (f"INSERT INTO period_totals ({', '.join(sk.PERIOD_COLUMNS)}, amount) "
                  "SELECT * FROM unnest(" + ", ".join(["%s::text[]"] * len(sk.PERIOD_COLUMNS))
                  + ", %s::bigint[]) "
                  f"ON CONFLICT ({', '.join(sk.PERIOD_COLUMNS)}) "
                  "DO UPDATE SET amount = period_totals.amount + EXCLUDED.amount")
#: what sk.with_periods needs and the batch may lack: anchors, periods of stored commits
_ANCHORS = "SELECT org, data FROM state_snapshots WHERE kind = 'cfg' AND org = ANY(%s)"
_COMMITS = ("SELECT rid, meter, period FROM ledger_entries WHERE type = 'commit' "
            "AND rid = ANY(%s)")
_SNAP = ("INSERT INTO state_snapshots (redis_key, org, kind, data, updated_at) "
         "SELECT redis_key, org, kind, data, updated_at FROM qg_snapshots_in "
         "ON CONFLICT (redis_key) DO UPDATE SET org = EXCLUDED.org, kind = EXCLUDED.kind, "
         "data = EXCLUDED.data, updated_at = EXCLUDED.updated_at "
         # a syncer slow to commit must not put back an older copy over a newer one
         "WHERE EXCLUDED.updated_at >= state_snapshots.updated_at")
#: pg_advisory_xact_lock key serialising concurrent migrators ("qgmigr")
_MIGRATE_LOCK = 0x7167_6D69_6772


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[r[i] for r in rows] for i in range(width)]


class PostgresSink:
    def __init__(self, url: str, connect_timeout: int = 5) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._conns: dict[str, psycopg.AsyncConnection[Any]] = {}
        self._locks = {"w": asyncio.Lock(), "r": asyncio.Lock()}

    async def _conn(self, role: str) -> psycopg.AsyncConnection[Any]:
        conn = self._conns.get(role)
        if conn is not None and not conn.closed and \
                conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            # a caller cancelled mid-query or mid-transaction (a syncer stopped, a
            # ListUsage whose client gave up) left it busy: every later use would fail
            # with "another command is already in progress". The server rolls back
            # what was not committed once the session is gone.
            await conn.close()
        if conn is None or conn.closed or conn.broken:
            conn = await psycopg.AsyncConnection.connect(self.url,
                                                         connect_timeout=self.connect_timeout)
            self._conns[role] = conn
        return conn

    async def migrate(self) -> list[str]:
        async with self._locks["w"]:
            conn = await self._conn("w")
            applied = []
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                await conn.execute(sk.SCHEMA_MIGRATIONS)
                cur = await conn.execute("SELECT version FROM schema_migrations")
                done = {r[0] for r in await cur.fetchall()}
                for version, stmts in sk.migrations():
                    if version in done:
                        continue
                    for s in stmts:
                        await conn.execute(s)
                    await conn.execute("INSERT INTO schema_migrations VALUES (%s, %s)",
                                       (version, int(time.time() * 1000)))
                    applied.append(version)
                if applied:  # staging tables are copies of the tables as they were
                    await conn.execute("DROP TABLE IF EXISTS pg_temp.qg_entries_in, "
                                       "pg_temp.qg_snapshots_in")
            return applied

    async def write(self, entries: Sequence[sk.Entry], snapshots: Sequence[sk.Snapshot]) -> int:
        async with self._locks["w"]:
            conn = await self._conn("w")
            async with conn.transaction():
                for stmt in _STAGE:
                    await conn.execute(stmt)
                cur = conn.cursor()
                entries = await self._with_periods(cur, entries, snapshots)
                inserted_ids: set[str] = set()
                if entries:
                    async with cur.copy(f"COPY qg_entries_in ({_ECOLS}) FROM STDIN") as cp:
                        for e in entries:
                            await cp.write_row(e.row())
                    await cur.execute(_INSERT)
                    inserted_ids = {r[0] for r in await cur.fetchall()}
                deltas = sk.usage_deltas(e for e in entries if e.entry_id in inserted_ids)
                if deltas:
                    await cur.execute(_TOTALS, _columns([(*k, v) for k, v in deltas.items()],
                                                        len(sk.TOTAL_COLUMNS) + 1))
                pdeltas = sk.period_deltas(e for e in entries if e.entry_id in inserted_ids)
                if pdeltas:
                    await cur.execute(_PERIOD_TOTALS, _columns(
                        [(*k, v) for k, v in pdeltas.items()], len(sk.PERIOD_COLUMNS) + 1))
                if snapshots:
                    async with cur.copy("COPY qg_snapshots_in (redis_key, org, kind, data, "
                                        "updated_at) FROM STDIN") as cp:
                        for s in snapshots:
                            await cp.write_row(s.row())
                    await cur.execute(_SNAP)
            return len(inserted_ids)

    @staticmethod
    async def _with_periods(cur: psycopg.AsyncCursor[Any], entries: Sequence[sk.Entry],
                            snapshots: Sequence[sk.Snapshot]) -> list[sk.Entry]:
        anchors = sk.anchors_of(snapshots)
        missing = sorted({e.org for e in entries if e.org and e.org not in anchors})
        if missing:
            await cur.execute(_ANCHORS, (missing,))
            for org, data in await cur.fetchall():
                anchors[org] = sk.anchor_of(json.loads(data))
        commits: dict[tuple[str, str], str] = {}
        rids = sk.refund_rids(entries)
        if rids:
            await cur.execute(_COMMITS, (rids,))
            commits = {(rid, meter): period for rid, meter, period in await cur.fetchall()}
        return sk.with_periods(entries, anchors, commits)

    async def usage(self, q: sk.UsageQuery) -> list[sk.UsageRow]:
        sql, params = sk.usage_sql(q, "%s")
        async with self._locks["r"]:
            conn = await self._conn("r")
            async with conn.transaction():
                cur = await conn.execute(sql, params)
                return sk.usage_rows(q, await cur.fetchall())

    async def snapshots(self) -> list[sk.Snapshot]:
        async with self._locks["r"]:
            conn = await self._conn("r")
            async with conn.transaction():
                cur = await conn.execute("SELECT redis_key, org, kind, data, updated_at "
                                         "FROM state_snapshots ORDER BY redis_key")
                return [sk.snapshot_of(r) for r in await cur.fetchall()]

    async def prune(self, before_ms: int) -> int:
        async with self._locks["w"]:
            conn = await self._conn("w")
            async with conn.transaction():
                cur = await conn.execute(sk.PRUNE_SQL.format(ph="%s"), (before_ms, sk.HELD_PATTERN))
                return cur.rowcount

    async def close(self) -> None:
        for conn in self._conns.values():
            if not conn.closed:
                await conn.close()
        self._conns.clear()
