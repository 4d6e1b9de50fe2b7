"""The SQL side of the syncer: the `Sink` protocol, the rows it stores, and what the
SQLite and PostgreSQL sinks share (migrations, the ListUsage query, usage aggregation).

A sink is opened from a URL (`open_sink`) without I/O; it connects on first use and
reconnects after a failure, so a database that is down at start-up only delays the sync.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from quotagate.errors import ConfigError
from quotagate.ledger.keys import unescape

DAY_MS = 86_400_000

#: ListUsage dimensions -> column (same name in ledger_entries, usage_totals and
#: period_totals; `period` is only in the last).
GROUP_COLUMNS = ("seat", "team", "assistant", "action", "feature", "day", "period")

#: Entry types that change usage: +amount / -amount.
_NET = {"commit": 1, "refund": -1}

_ESCAPED = ("org", "team", "seat", "assistant", "meter", "action", "feature")


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger stream entry, ids unescaped."""

    entry_id: str
    shard: int
    stream_id: str
    type: str
    rid: str
    org: str
    team: str
    seat: str
    assistant: str
    meter: str
    action: str
    feature: str
    amount: int
    net: int
    at_ms: int
    day: str
    raw: str
    pid: int = 0      # the billing period id the entry names (its takes, `period`); 0 none
    period: str = ""  # the billing period it is attributed to (with_periods)
    anchor: int = 0   # the org's anchor day when it was written (spend entries); 0 unknown

    def row(self) -> tuple[object, ...]:
        return (self.entry_id, self.shard, self.stream_id, self.type, self.rid, self.org,
                self.team, self.seat, self.assistant, self.meter, self.action, self.feature,
                self.amount, self.net, self.at_ms, self.day, self.raw, self.period)


ENTRY_COLUMNS = ("entry_id", "shard", "stream_id", "type", "rid", "org", "team", "seat",
                 "assistant", "meter", "action", "feature", "amount", "net", "at_ms", "day",
                 "raw", "period")

#: usage_totals key columns, in the order of `UsageKey`.
TOTAL_COLUMNS = ("org", "meter", "day", "team", "seat", "assistant", "action", "feature")
UsageKey = tuple[str, str, str, str, str, str, str, str]
#: period_totals key columns, in the order of `PeriodKey`.
PERIOD_COLUMNS = ("org", "meter", "period", "day", "team", "seat", "assistant", "action",
                  "feature")
PeriodKey = tuple[str, str, str, str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The contents of one Redis hash at sync time."""

    redis_key: str
    org: str
    kind: str  # cfg | bal | pur | hold | plan
    data: Mapping[str, str]
    updated_at: int

    def row(self) -> tuple[object, ...]:
        return (self.redis_key, self.org, self.kind,
                json.dumps(dict(self.data), sort_keys=True), self.updated_at)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    org: str
    meter: str = ""              # empty: every meter
    start_ms: int | None = None  # inclusive
    end_ms: int | None = None    # exclusive
    group_by: tuple[str, ...] = ()
    limit: int = 100
    after: tuple[str, ...] | None = None  # keyset: the last row's (group values..., meter)


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: Mapping[str, str]
    meter: str
    amount: int

    def key(self, group_by: Sequence[str]) -> tuple[str, ...]:
        return (*(self.group[g] for g in group_by), self.meter)


class Sink(Protocol):
    """Where the syncer copies the ledger; what ListUsage and restore read."""

    url: str

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the versions applied now."""
        ...

    async def write(self, entries: Sequence[Entry], snapshots: Sequence[Snapshot]) -> int:
        """In ONE transaction: attribute the entries to billing periods (with_periods),
        insert those not stored yet, add the usage of those inserted to usage_totals and
        period_totals, upsert the snapshots. Returns how many were inserted."""
        ...

    async def usage(self, q: UsageQuery) -> list[UsageRow]:
        """At most `q.limit` rows after `q.after`, ordered by (group values, meter)."""
        ...

    async def snapshots(self) -> list[Snapshot]:
        """Every stored snapshot (for restore)."""
        ...

    async def prune(self, before_ms: int) -> int:
        """Delete the snapshots of resolved holds last written before `before_ms` (Redis
        keeps a resolved hold for the retention only); open holds and every other kind
        stay. Returns how many were deleted."""
        ...

    async def close(self) -> None: ...


def open_sink(url: str) -> Sink:
    """`sqlite:///path` or `postgresql://…` (no I/O until first use)."""
    if url.startswith("sqlite:///"):
        from quotagate.sync.sqlite import SqliteSink

        return SqliteSink(url)
    if url.startswith(("postgresql://", "postgres://")):
        from quotagate.sync.postgres import PostgresSink

        return PostgresSink(url)
    raise ConfigError("must start with postgresql:// or sqlite:///", "QUOTAGATE_DATABASE_URL")


def default_url(database_url: str, data_dir: Path) -> str:
    return database_url or f"sqlite:///{Path(data_dir).absolute() / 'quotagate.db'}"


# -- migrations ---------------------------------------------------------------------------
def migrations() -> list[tuple[str, list[str]]]:
    """(version, statements) of every migration file, in order."""
    out = []
    files = resources.files("quotagate.sync").joinpath("migrations")
    for f in sorted((f for f in files.iterdir() if f.name.endswith(".sql")),
                    key=lambda f: f.name):
        text = "\n".join(line for line in f.read_text("utf-8").splitlines()
                         if not line.lstrip().startswith("--"))
        stmts = [s.strip() for s in text.split(";\n") if s.strip()]
        out.append((f.name.removesuffix(".sql"), [s.rstrip(";") for s in stmts]))
    return out


#: resolved holds last snapshotted before a cut-off (a held hold has `"st": "H"` in the
#: JSON written by Snapshot.row: sorted keys, default separators)
PRUNE_SQL = ("DELETE FROM state_snapshots WHERE kind = 'hold' AND updated_at < {ph} "
             "AND data NOT LIKE {ph}")
HELD_PATTERN = '%"st": "H"%'

SCHEMA_MIGRATIONS = ("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)")


# -- stream entries -----------------------------------------------------------------------
def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else v


def day_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


#: the values of a spend-path entry's field `p`, in order (lib.lua's spend_entry)
SPEND_FIELDS = ("type", "rid", "org", "team", "seat", "assistant", "meter", "amount", "takes",
                "late", "action", "feature", "labels", "at", "anchor")


def entry_fields(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str]:
    """A ledger entry's fields as text. The spend path writes its entries as one field
    `p` (the SPEND_FIELDS values in order, newline-separated, empty values kept: lib.lua's
    spend_entry); builds before wrote them as field `e` (names and values alternating),
    and before that a field each, as other entries still are. Any form: the non-empty
    fields."""
    f = {_text(k): _text(v) for k, v in fields.items()}
    values = f.pop("p", None)
    if values is not None:
        f.update((k, v) for k, v in zip(SPEND_FIELDS, values.split("\n"), strict=False) if v)
    packed = f.pop("e", None)
    if packed is not None:
        parts = packed.split("\n")
        f.update((k, v) for k, v in zip(parts[0::2], parts[1::2], strict=False) if v)
    return f


#: what a BIGINT column holds (amounts above 2^50 are refused by the scripts anyway)
_BIGINT = 2**63 - 1


def entry_of(shard: int, stream_id: bytes | str,
             fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Entry:
    """A stream entry as the row to store (ids unescaped, net usage, UTC day). Never
    raises: an entry that cannot be read or stored as written (not UTF-8, an undecodable
    escape, a NUL, a time or amount out of range: an older build's, a hand-made XADD)
    is stored as type `invalid` with no usage and its fields in `raw`, so that one bad
    entry never fails its batch, and with it every shard's sync, forever."""
    try:
        e = _entry_of(shard, stream_id, fields)
        if abs(e.amount) > _BIGINT or abs(e.at_ms) > _BIGINT or "\x00" in "".join(
                str(v) for v in e.row() if isinstance(v, str)):
            raise ValueError("out of range or NUL")
        return e
    except (ValueError, OverflowError, OSError) as err:  # UnicodeError is a ValueError
        return invalid_entry(shard, stream_id, fields, err)


def invalid_entry(shard: int, stream_id: bytes | str,
                  fields: Mapping[bytes, bytes] | Mapping[str, str],
                  err: BaseException) -> Entry:
    """The row of an entry `entry_of` cannot read: its fields (undecodable bytes
    escaped) and the error in `raw`, no usage, the time of its stream id."""
    def text(v: bytes | str) -> str:
        return v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v

    sid = text(stream_id)
    at = int(sid.split("-")[0])
    raw = {text(k): text(v) for k, v in fields.items()}
    raw["_invalid"] = f"{type(err).__name__}: {err}"
    return Entry(f"{shard}-{sid}", shard, sid, "invalid", "", "", "", "", "", "", "", "", 0,
                 0, at, day_of(at), json.dumps(raw, sort_keys=True))


def _entry_of(shard: int, stream_id: bytes | str,
              fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Entry:
    f = entry_fields(fields)
    sid = _text(stream_id)
    kind = f.get("type", "")
    ids = {name: unescape(f.get(name, "")) for name in _ESCAPED}
    try:
        amount = int(f.get("amount") or 0)
    except ValueError:
        amount = 0
    try:
        at = int(f.get("at") or 0)
    except ValueError:
        at = 0
    if not at:
        at = int(sid.split("-")[0])
    return Entry(f"{shard}-{sid}", shard, sid, kind, f.get("rid", ""), ids["org"], ids["team"],
                 ids["seat"], ids["assistant"], ids["meter"], ids["action"], ids["feature"],
                 amount, amount * _NET.get(kind, 0), at, day_of(at),
                 json.dumps(f, sort_keys=True, ensure_ascii=False), named_period(f),
                 anchor=anchor_of(f) if f.get("anchor") else 0)


# -- billing periods ----------------------------------------------------------------------
# lib.lua's period_compute: a period starts on the org's anchor day (1-28) at 00:00 UTC; its
# id is year * 12 + month - 1 of that start. Every take ("code:pid:amount", lib.lua's
# takes_encode) names the period of the wallet it drew from when it was held or charged
# (top-up takes too); debt ("D") and gauge meters name none (pid 0).
_TAKE = re.compile(r"([A-Za-z]+):(-?\d+):(\d+)")
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def named_period(f: Mapping[str, str]) -> int:
    """The period an entry's fields name: the earliest of its takes (a Commit of a hold
    made in an earlier period charges that period's takes first; what it charges beyond
    the hold is the same usage), else a period_reset's `period`; 0: none."""
    pids = [int(m[2]) for m in _TAKE.finditer(f.get("takes", "")) if int(m[2]) > 0]
    if pids:
        return min(pids)
    try:
        return max(0, int(f.get("period") or 0))
    except ValueError:
        return 0


def period_at(ms: int, anchor: int) -> int:
    """The id of the period holding `ms` for an org anchored on `anchor` (period_of)."""
    d = dt.date.fromordinal(_EPOCH_ORDINAL + ms // DAY_MS)
    y, m = d.year, d.month
    if d.day < anchor:
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return y * 12 + m - 1


def period_label(pid: int, anchor: int | None) -> str:
    """The period's start date, "2026-11-15"; its month "2026-11" when the anchor is
    unknown."""
    y, m = divmod(pid, 12)
    return f"{y:04d}-{m + 1:02d}" if anchor is None else f"{y:04d}-{m + 1:02d}-{anchor:02d}"


def anchor_of(cfg: Mapping[str, str]) -> int:
    """An org's anchor day from its configuration hash (lib.lua: at least 1)."""
    try:
        return max(1, int(cfg.get("anchor") or 0))
    except ValueError:
        return 1


def anchors_of(snapshots: Iterable[Snapshot]) -> dict[str, int]:
    return {s.org: anchor_of(s.data) for s in snapshots if s.kind == "cfg"}


def refund_rids(entries: Iterable[Entry]) -> list[str]:
    """The reservations whose refunds need the period of their commit."""
    return sorted({e.rid for e in entries if e.type == "refund" and e.rid})


def with_periods(entries: Sequence[Entry], anchors: Mapping[str, int],
                 commits: Mapping[tuple[str, str], str]) -> list[Entry]:
    """The entries with `period` set. The period an entry names (named_period), else the
    one holding its time for the org's anchor day; a refund: the period of the commit it
    gives back (`commits`, (rid, meter) -> period of the stored commits, else a commit
    earlier in `entries`), else its own time's. `anchors`: org -> anchor day (the org's
    configuration when synced), for entries that do not carry the anchor day they were
    written with (spend entries do: the anchor may change while they wait for SQL); an org
    without one gets "YYYY-MM" labels."""
    seen = dict(commits)
    out = []
    for e in entries:
        anchor = e.anchor or anchors.get(e.org)
        label = seen.get((e.rid, e.meter)) if e.type == "refund" else None
        if label is None:
            pid = e.pid or period_at(e.at_ms, anchor or 1)
            label = period_label(pid, anchor)
        if e.type == "commit":
            seen.setdefault((e.rid, e.meter), label)
        out.append(dataclasses.replace(e, period=label))
    return out


def usage_deltas(inserted: Iterable[Entry]) -> dict[UsageKey, int]:
    """usage_totals increments of the entries actually inserted."""
    out: dict[UsageKey, int] = {}
    for e in inserted:
        if e.type not in _NET or not e.net:  # as the entries query: net <> 0
            continue
        k = (e.org, e.meter, e.day, e.team, e.seat, e.assistant, e.action, e.feature)
        out[k] = out.get(k, 0) + e.net
    return dict(sorted(out.items()))  # one lock order for concurrent writers


def period_deltas(inserted: Iterable[Entry]) -> dict[PeriodKey, int]:
    """period_totals increments of the entries actually inserted."""
    out: dict[PeriodKey, int] = {}
    for e in inserted:
        if e.type not in _NET or not e.net:
            continue
        k = (e.org, e.meter, e.period, e.day, e.team, e.seat, e.assistant, e.action,
             e.feature)
        out[k] = out.get(k, 0) + e.net
    return dict(sorted(out.items()))


# -- ListUsage ----------------------------------------------------------------------------
def usage_sql(q: UsageQuery, ph: str) -> tuple[str, list[object]]:
    """The ListUsage query for placeholder style `ph` ('?' or '%s').

    Day-aligned ranges (and no range) read the per-day totals (period_totals when grouped
    by period, else usage_totals); other ranges sum the entries themselves, so the answer
    is exact for any [start, end)."""
    for g in q.group_by:
        if g not in GROUP_COLUMNS:  # never trust a name into SQL
            raise ValueError(g)
    cols = [*q.group_by, "meter"]
    aligned = all(t is None or t % DAY_MS == 0 for t in (q.start_ms, q.end_ms))
    where = [f"org = {ph}"]
    params: list[object] = [q.org]
    if q.meter:
        where.append(f"meter = {ph}")
        params.append(q.meter)
    if aligned:
        table = "period_totals" if "period" in q.group_by else "usage_totals"
        amount = "amount"
        if q.start_ms is not None:
            where.append(f"day >= {ph}")
            params.append(day_of(q.start_ms))
        if q.end_ms is not None:
            where.append(f"day < {ph}")
            params.append(day_of(q.end_ms))
    else:
        table, amount = "ledger_entries", "net"
        where.append("net <> 0")
        if q.start_ms is not None:
            where.append(f"at_ms >= {ph}")
            params.append(q.start_ms)
        if q.end_ms is not None:
            where.append(f"at_ms < {ph}")
            params.append(q.end_ms)
    clist = ", ".join(cols)
    sql = (f"SELECT {clist}, SUM({amount}) AS amount FROM {table} "
           f"WHERE {' AND '.join(where)} GROUP BY {clist}")
    sql = f"SELECT {clist}, amount FROM ({sql}) g"
    if q.after is not None:
        sql += f" WHERE ({clist}) > ({', '.join([ph] * len(cols))})"
        params.extend(q.after)
    sql += f" ORDER BY {clist} LIMIT {int(q.limit)}"
    return sql, params


def usage_rows(q: UsageQuery, rows: Iterable[Sequence[object]]) -> list[UsageRow]:
    n = len(q.group_by)
    return [UsageRow(dict(zip(q.group_by, (str(v) for v in r[:n]), strict=True)),
                     str(r[n]), int(r[n + 1])) for r in rows]  # type: ignore[call-overload]


def snapshot_of(row: Sequence[object]) -> Snapshot:
    key, org, kind, data, updated = row
    return Snapshot(str(key), str(org), str(kind), json.loads(str(data)),
                    int(updated))  # type: ignore[call-overload]
