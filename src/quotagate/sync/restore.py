"""`quotagate restore`: write the SQL snapshots of the Redis state back into Redis after
Redis lost data (a crash beyond its AOF, a failover to an empty replica, FLUSHALL).

Every snapshot is merged into what Redis holds now, field by field:

- balances (`bal`): per wallet (the packed field `w`, `T:<team>:w`, `S:<seat>:w`: in
  Redis MessagePack, in a snapshot a JSON array of the same counters; see
  ledger/wallet.py):
  when Redis and SQL hold the wallet for different periods (`p`), the newer period wins
  the whole wallet (monthly counters of an older period mean nothing in a newer one);
  otherwise the monotonic counters `mu`, `tu` and `cu` and the grant `mg` keep the larger
  of the two, `tb` (top-up left) the smaller, and every other counter takes SQL's value.
  Of the org's other fields, `d` (debt) and `evseq` keep the larger, `iac` (a count of
  another key's entries) is never restored, `oub`, `ev` and `atu` (the state of the org
  wallet's period: unbilled overage, wallet events, auto top-up) stay Redis's when its
  org wallet is in a newer period than SQL's, the rest take SQL's value; fields only Redis
  has stay. A snapshot taken by an earlier build, which kept one
  field per counter, is packed first;
- org configuration (`cfg`), purchases (`pur`), plans (`plan`) and holds (`hold`): the
  union — fields Redis lacks come from SQL, fields Redis has stay (they are newer);
- a restored hold still `H` (held) is re-added to its shard's expiry set with score `exp`,
  so the sweeper releases it when due; a resolved hold that Redis had lost gets the
  normal retention TTL again; an org with a plan is re-added to the plan's org set;
- a balance hash of a counter meter whose merged state has overage to close in its
  period (org wallet `ou` > 0 or unbilled `oub` > 0: what makes lib.lua's roll emit
  `overage.period_closed`), or of a gauge meter with unbilled overage of a period
  (`gop`), is re-added to its shard's overage index `ovc`
  (`<org>|<meter>` -> the end of that period, ms, from the org's anchor day), so the
  sweeper closes and bills the period when it ends even if nobody touches the org. An
  entry Redis has already keeps the later of the two ends (ZADD GT, as lib.lua's plain
  ZADD, which only ever moves an entry to a later period): an earlier one is an entry
  lib.lua leaves behind after a touch closed that period, and the sweeper would drop it
  without closing the period the hash is in.

Nothing else is replayed: idempotency keys of Reserve are not restored (a retry of a
Reserve made before the loss makes a new hold), nor events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quotagate.embedded import EmbeddedRedis
from quotagate.ledger import wallet
from quotagate.ledger.keys import Keys, bal_key, escape, unescape
from quotagate.ledger.store import LedgerOptions
from quotagate.sync.sink import DAY_MS, Sink, Snapshot, anchor_of

log = logging.getLogger("quotagate.restore")

#: wallet counters (lib.lua's WF order) and how two copies of one period merge
WALLET = wallet.FIELDS
LARGER = frozenset({"mu", "tu", "cu", "mg"})
#: plain fields of a balance hash that only grow
MONOTONIC = frozenset({"d", "evseq"})
#: fields of a balance hash that count what another key holds (`iac`: the deactivated
#: assistants in `<bal>|ia`, which snapshots do not copy): never restored, the scripts
#: count again where the field is absent
DERIVED = frozenset({"iac"})
#: fields of a balance hash that belong to the org wallet's period (lib.lua: the unbilled
#: overage of the period, wallet events' and auto top-up's state, which name their period)
ORG_PERIOD = frozenset({"oub", "ev", "atu"})
CHUNK = 500
#: the shard's index of overage periods to close (lib.lua's overage_events, close_periods)
OVC = "ovc"
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@dataclass
class RestoreCounts:
    keys: int = 0     # hashes written (at least one field)
    fields: int = 0   # fields written
    holds: int = 0    # holds re-armed in an expiry set
    overage: int = 0  # balances re-added to their shard's overage index (`ovc`)


def _int(v: str | None) -> int:
    try:
        return int(v) if v is not None else 0
    except ValueError:
        return 0


def wallet_text(counters: Mapping[str, int]) -> str:
    """A wallet's text form (a snapshot's): the WALLET integers as a JSON array."""
    return "[" + ",".join(str(counters.get(name, 0)) for name in WALLET) + "]"


def _wallet(v: str) -> dict[str, int] | None:
    """A wallet in any stored form (wallet.decode)."""
    ints = wallet.decode(v)
    return None if ints is None else dict(zip(WALLET, ints, strict=True))


def merge_wallet(redis_v: str, sql_v: str) -> str:
    """One packed wallet (see the module doc)."""
    r, s = _wallet(redis_v), _wallet(sql_v)
    if r is None:
        return sql_v
    if s is None or r["p"] > s["p"]:
        return redis_v  # Redis holds a newer period of this wallet: keep it whole
    if s["p"] > r["p"]:
        return sql_v    # SQL's period is newer: its wallet wins
    merged = {name: max(r[name], s[name]) if name in LARGER
              else min(r[name], s[name]) if name == "tb" else s[name] for name in WALLET}
    return wallet_text(merged)


def packed(h: Mapping[str, str]) -> dict[str, str]:
    """A balance hash with any wallet in the earlier layout (one field per counter:
    `mu`, `T:<team>:mu`, …, as builds before the packed layout wrote them) packed into
    one `w` field; a wallet already packed wins over loose counters of the same prefix."""
    loose: dict[str, dict[str, int]] = {}
    out: dict[str, str] = {}
    for f, v in h.items():
        i = f.rfind(":")
        pfx, name = f[: i + 1], f[i + 1:]
        if name in WALLET and (pfx == "" or pfx.startswith(("T:", "S:"))):
            loose.setdefault(pfx, {})[name] = _int(v)
        else:
            out[f] = v
    for pfx, counters in loose.items():
        out.setdefault(pfx + "w", wallet_text(counters))
    return out


def merge_balance(redis_h: Mapping[str, str], sql_h: Mapping[str, str]) -> dict[str, str]:
    """Fields to write into a balance hash (see the module doc)."""
    out: dict[str, str] = {}
    sql_p = packed(sql_h)
    rw, sw = _wallet(redis_h.get("w", "")), _wallet(sql_p.get("w", ""))
    # Redis's org wallet is in a newer period than SQL's: the org's state of that period
    # (what is unbilled of its overage, wallet events, auto top-up) is Redis's too. SQL's
    # unbilled rest of an older period, which Redis closed and billed, would be billed again.
    redis_period = rw is not None and sw is not None and rw["p"] > sw["p"]
    for f, sv in sql_p.items():
        if f in DERIVED:
            continue
        rv = redis_h.get(f)
        if redis_period and f in ORG_PERIOD and rv is not None:
            continue
        if rv is None:
            out[f] = sv
        elif f == "w" or f.endswith(":w"):
            out[f] = merge_wallet(rv, sv)
        elif f in MONOTONIC:
            out[f] = str(max(_int(rv), _int(sv)))
        else:
            out[f] = sv
    return {f: v for f, v in out.items() if redis_h.get(f) != v}


def period_end_ms(pid: int, anchor: int) -> int:
    """The end (ms) of billing period `pid` (year * 12 + month - 1 of its start) of an org
    anchored on day `anchor` (1-28): the anchor day of the next month, 00:00 UTC (lib.lua's
    period_compute; sink.period_at is its inverse)."""
    y, m = divmod(pid + 1, 12)
    return (dt.date(y, m + 1, anchor).toordinal() - _EPOCH_ORDINAL) * DAY_MS


def overage_period(h: Mapping[str, str]) -> int:
    """The period whose overage a balance hash (text form) has yet to close, else 0: its
    org wallet's period, when the wallet used overage in it (`ou`) or some is unbilled
    (`oub`) — what makes lib.lua's overage_events emit overage.period_closed when the
    wallet rolls. A gauge meter's wallet has period 0: its unbilled overage names the
    period it accrued in (`gop`, lib.lua's gauge_overage_events)."""
    gop = _int(h.get("gop"))
    if gop > 0:
        return gop
    w = _wallet(h.get("w", ""))
    if w is None or w["p"] <= 0:
        return 0
    return w["p"] if w["ou"] > 0 or _int(h.get("oub")) > 0 else 0


def overage_entry(keys: Keys, org: str, key: str) -> tuple[str, str] | None:
    """(index key, member) of the overage index entry of balance hash `key` of `org`:
    lib.lua's `<shard prefix>ovc` and `<escaped org>|<escaped meter>`; None when `key` is
    not a balance hash of `org` in this deployment's layout."""
    prefix, org_e = keys.org_prefix(org), escape(org)
    head = bal_key(prefix, org_e, "")
    meter_e = key[len(head):] if key.startswith(head) else ""
    if not meter_e or ":" in meter_e:
        return None
    return prefix + OVC, f"{org_e}|{meter_e}"


def merge_union(redis_h: Mapping[str, str], sql_h: Mapping[str, str]) -> dict[str, str]:
    return {f: v for f, v in sql_h.items() if f not in redis_h}


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def balance_text(h: Mapping[Any, Any]) -> dict[str, str]:
    """A balance hash as read from Redis, in text: wallets (MessagePack) as JSON arrays."""
    out: dict[str, str] = {}
    for f, v in h.items():
        name = _text(f)
        out[name] = (wallet.text(v) or _text(v)) if wallet.is_wallet(name) else _text(v)
    return out


def balance_redis(h: Mapping[str, str]) -> dict[str, str | bytes]:
    """Fields to write into a balance hash: wallets in their Redis form, MessagePack."""
    out: dict[str, str | bytes] = {}
    for f, v in h.items():
        ints = wallet.decode(v) if wallet.is_wallet(f) else None
        out[f] = wallet.encode(ints) if ints is not None else v
    return out


async def restore(redis: Any, keys: Keys, sink: Sink,
                  retain_ms: int = LedgerOptions().retain_ms) -> RestoreCounts:
    snaps = await sink.snapshots()
    counts = RestoreCounts()
    overage: list[tuple[str, str, str, int]] = []
    for i in range(0, len(snaps), CHUNK):
        await _restore_chunk(redis, keys, snaps[i:i + CHUNK], retain_ms, counts, overage)
    # after every chunk: an org's configuration (its anchor day) may come in any of them
    for i in range(0, len(overage), CHUNK):
        await _index_overage(redis, keys, overage[i:i + CHUNK])
    counts.overage = len(overage)
    log.info("restored %d hashes (%d fields), re-armed %d holds, re-indexed %d overage "
             "periods", counts.keys, counts.fields, counts.holds, counts.overage)
    return counts


async def _index_overage(redis: Any, keys: Keys,
                         due: list[tuple[str, str, str, int]]) -> None:
    """Re-add (org, index key, member, period) to the overage index, each scored with
    its period's end for the org's anchor day as Redis now holds it (the configuration
    is restored): what lib.lua reads when it indexes and when the sweeper closes."""
    pipe = redis.pipeline(transaction=False)
    for org, _, _, _ in due:
        pipe.hget(keys.cfg(org), "anchor")
    anchors = await pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for (_, idx, member, pid), a in zip(due, anchors, strict=True):
        anchor = anchor_of({} if a is None else {"anchor": _text(a)})
        pipe.zadd(idx, {member: period_end_ms(pid, anchor)}, gt=True)
    await pipe.execute()


async def _restore_chunk(redis: Any, keys: Keys, snaps: list[Snapshot], retain_ms: int,
                         counts: RestoreCounts,
                         overage: list[tuple[str, str, str, int]]) -> None:
    pipe = redis.pipeline(transaction=False)
    for s in snaps:
        pipe.hgetall(s.redis_key)
    current = [balance_text(h or {}) if s.kind == "bal"
               else {_text(f): _text(v) for f, v in (h or {}).items()}
               for s, h in zip(snaps, await pipe.execute(), strict=True)]
    pipe = redis.pipeline(transaction=False)
    for s, now in zip(snaps, current, strict=True):
        sql = dict(s.data)
        write: Mapping[str, str | bytes]
        if s.kind == "bal":
            changed = merge_balance(now, sql)
            write = balance_redis(changed)
            # the hash as it is once written: is an overage period of it left to close?
            pid = overage_period({**now, **changed})
            entry = overage_entry(keys, s.org, s.redis_key) if pid else None
            if entry is not None:
                overage.append((s.org, *entry, pid))
        else:
            write = merge_union(now, sql)
        if write:
            pipe.hset(s.redis_key, mapping=write)
            counts.keys += 1
            counts.fields += len(write)
        if s.kind == "hold":
            merged = {**sql, **now}
            rid = s.redis_key.rpartition(":h:")[2]
            if merged.get("st") == "H" and merged.get("exp"):
                pipe.zadd(keys.expiries(keys.shard_of_reservation(rid)),
                          {rid: _int(merged["exp"])})
                counts.holds += 1
            elif not now:
                pipe.pexpire(s.redis_key, retain_ms)
        if s.kind == "cfg" and sql.get("plan") and s.org:
            pipe.sadd(keys.plan_orgs(unescape(sql["plan"])), s.org)
    await pipe.execute()


def running_pid(embedded: EmbeddedRedis) -> int | None:
    """The pid of a redis-server already running on this data dir (a `quotagate serve`'s,
    or a `restore`'s): its pidfile names a live redis-server, or (0) its socket answers.
    None when nothing runs there, or only a Redis a killed serve left behind (no parent
    any more), which the restore's own start stops."""
    try:
        pid = int((embedded.dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0  # no pidfile: redis-server removes it when it stops
    if pid > 0 and _is_redis(pid):
        # left running by a killed serve: EmbeddedRedis.start stops it and takes over
        return None if embedded.owner_gone() else pid
    return 0 if embedded.socket and embedded._ping() else None


def _is_redis(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # alive, not ours to signal
    except OSError:
        return False  # a stale pidfile: the process is gone
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"redis" in cmdline.read_bytes()
    except OSError:
        return not cmdline.parent.is_dir()  # without /proc: a live pid is taken as it


def preflight(db_url: str, embedded: EmbeddedRedis | None) -> str:
    """Why the restore must not start ("" when it may): the embedded Redis of the data
    dir is running, or the SQLite file is missing."""
    pid = None if embedded is None else running_pid(embedded)
    if embedded is not None and pid is not None:
        return (f"the embedded Redis of {embedded.dir.parent} is running "
                f"({f'pid {pid}' if pid else 'its socket answers'}): stop the "
                "`quotagate serve` on that data dir first, or restore into the running "
                f"Redis with --redis-url {embedded.url}")
    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).exists():
        return (f"nothing to restore from: no {db_url.removeprefix('sqlite:///')} "
                "(QUOTAGATE_DATABASE_URL, QUOTAGATE_DATA_DIR)")
    return ""


async def main(settings: Any) -> int:
    """`quotagate restore`: snapshots from QUOTAGATE_DATABASE_URL into QUOTAGATE_REDIS_URL;
    without a Redis URL, into the embedded Redis of QUOTAGATE_DATA_DIR (started for the
    restore and stopped after it, AOF fsynced), which no `serve` may be running on."""
    from quotagate.app import App
    from quotagate.sync.sink import default_url, open_sink

    url, embedded = settings.redis_url, None
    db_url = default_url(settings.database_url, settings.data_dir)
    if not url:
        embedded = EmbeddedRedis(settings.data_dir)
    refused = preflight(db_url, embedded)
    if refused:
        log.error("quotagate restore: %s", refused)
        return 1
    if embedded is not None:
        url = await asyncio.to_thread(embedded.start)
    try:
        redis = App(settings).redis_client(url)
        sink = open_sink(db_url)
        try:
            c = await restore(redis, Keys(settings.shards), sink,
                              retain_ms=settings.retention_seconds * 1000)
        finally:
            await sink.close()
            await redis.aclose()
    finally:
        if embedded is not None:
            await embedded.stop()
    where = f" into the embedded Redis of {settings.data_dir}" if embedded else ""
    print(f"restored {c.keys} hashes ({c.fields} fields){where}; "
          f"{c.holds} open holds re-armed; {c.overage} overage periods re-indexed")
    return 0
