"""The ledger on Redis: validates input, calls one script per operation, and turns the
scripts' replies into model objects. The runtime operations are exactly one round trip."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from quotagate.clock import Clock
from quotagate.errors import (
    BY_CODE,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotagateError,
    Unavailable,
)
from quotagate.ledger import validate
from quotagate.ledger.keys import Keys, bal_key, cfg_key, escape, hold_key, idem_key, unescape
from quotagate.ledger.model import (
    Allowance,
    Catalog,
    Charge,
    ChargeResult,
    CheckResult,
    Decision,
    DenyReason,
    ExtendResult,
    HoldResult,
    HoldState,
    MeterBalance,
    MeterKind,
    ReserveResult,
    SeatLimit,
    Subject,
    TopUpResult,
)
from quotagate.ledger.mux import ClusterMux, Mux
from quotagate.ledger.scripts import Scripts

T = TypeVar("T")

DAY_MS = 86_400_000


#: TTL of the hold behind Ledger.charge_now: it lives for the one round trip between its
#: Reserve and Commit, and expires this soon when the Commit is lost
CHARGE_HOLD_TTL_MS = 30_000

#: how long a Transfer's or Adjust's idempotency record is kept (admin retries come late)
ADMIN_RETAIN_MS = 30 * DAY_MS


@dataclass(frozen=True)
class LedgerOptions:
    default_ttl_s: int = 300
    max_ttl_s: int = 86_400
    #: how long resolved holds and idempotency records are kept (repeats answer the same)
    retain_ms: int = DAY_MS
    #: approximate cap of each shard's ledger stream (0: none; the syncer trims it)
    ledger_maxlen: int = 1_000_000
    sweep_batch: int = 100
    #: wallet.low fires when this much of an org's wallet is used (percent, ascending)
    low_thresholds: tuple[int, ...] = (80,)
    #: spend-path scripts share one pipelined connection (ledger/mux.py) on a single
    #: Redis; False: each goes through redis-py's pool like every other command
    pipeline: bool = True
    #: spend-path scripts run as Redis Functions where the server has them (scripts.py)
    functions: bool = True


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _i(v: Any) -> int:
    return int(v)  # int() takes ASCII digits as bytes too


def _balance(row: Sequence[Any]) -> MeterBalance:
    return MeterBalance(unescape(_s(row[0])), *map(int, row[1:13]))


def _charges(flat: Sequence[Any]) -> tuple[Charge, ...]:
    return tuple(Charge(unescape(_s(flat[i])), _i(flat[i + 1])) for i in range(0, len(flat), 2))


def _flat_charges(reply: Sequence[Any], i: int) -> tuple[tuple[Charge, ...], int]:
    """A flat reply's list of charges at `i` (count, then meter, amount pairs), and the
    index after it."""
    end = i + 1 + 2 * int(reply[i])
    return _charges(reply[i + 1:end]), end


def _flat_balances(reply: Sequence[Any], i: int) -> tuple[MeterBalance, ...]:
    """A flat reply's list of balances at `i` (count, then 13 figures each)."""
    return tuple(_balance(reply[j:j + 13]) for j in range(i + 1, i + 1 + 13 * int(reply[i]), 13))


def _hold_result(reply: Sequence[Any]) -> HoldResult:
    """A Commit's or Refund's flat reply: state, amounts, balances."""
    amounts, at = _flat_charges(reply, 2)
    return HoldResult(_HOLD_STATE[reply[1]], amounts, _flat_balances(reply, at))


#: the scripts' codes (bytes, as replies carry them) -> enum members: a dict lookup
#: instead of an Enum call per reply
_DECISION = {d.value.encode(): d for d in Decision}
_REASON = {r.value.encode(): r for r in DenyReason}
_HOLD_STATE = {int(s): s for s in HoldState}


def _decision(v: Any) -> Decision:
    return _DECISION.get(v) or Decision(_s(v))


def _reason(v: Any) -> DenyReason:
    r = _REASON.get(v)
    return r if r is not None else DenyReason(_s(v))


def _closed_while_writing(e: BaseException) -> bool:
    """An AttributeError/TypeError raised by redis-py's asyncio connection while it wrote
    to a transport that was being closed (not a bug of ours)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(("redis/asyncio/connection.py",
                                                    "asyncio/streams.py")) and \
                tb.tb_frame.f_code.co_name in ("_send_packed_command", "send_packed_command",
                                                "writelines", "write"):
            return True
        tb = tb.tb_next
    return False


def _raise_if_error(reply: Sequence[Any]) -> None:
    if _s(reply[0]) == "ERR":
        cls = BY_CODE.get(_s(reply[1]), QuotagateError)
        raise cls(_s(reply[3]), _s(reply[2]))


class _Tokens:
    """Reservation-id tokens: 16 random bytes as 32 hex digits each, from os.urandom (as
    secrets.token_hex), drawn 256 at a time: one getrandom call per 256 Reserves instead
    of one each. Emptied in a forked child, which must not reuse its parent's."""

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._hex, self._at = "", 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(16 * 256).hex(), 0
        self._at = at + 32
        return self._hex[at:at + 32]


#: one per process (every Ledger draws from it)
TOKENS = _Tokens()

#: sweeper steps in flight at once where each takes a pooled connection of its own
SWEEP_IN_FLIGHT = 8


def route_fcall_by_its_keys(client: Any) -> None:
    """Route FCALL on a Redis Cluster client by the keys in its arguments, as redis-py
    already does for EVALSHA. For FCALL it asks a server instead, with COMMAND GETKEYS,
    always on the same node: a second round trip for every spend-path call, and in a
    burst (the sweeper's 256 shards at once) every connection of that one node's pool.
    An FCALL's keys follow its key count, as EVALSHA's do: ("FCALL", name, numkeys,
    key, …). Anything else, and an FCALL whose keys span slots, goes to redis-py as
    before. Installed on the client once (idempotent)."""
    original = client._determine_slot
    if getattr(original, "quotagate_fcall", False):
        return

    async def determine_slot(*args: Any) -> int:
        if len(args) > 3 and args[0] in ("FCALL", "FCALL_RO"):
            n = int(args[2])
            slots = {client.keyslot(k) for k in args[3:3 + n]}
            if len(slots) == 1:
                return int(slots.pop())
        return int(await original(*args))

    determine_slot.quotagate_fcall = True  # type: ignore[attr-defined]
    client._determine_slot = determine_slot


class Ledger:
    """Wallets and holds of every org, kept in Redis by the Lua scripts."""

    def __init__(self, redis: Any, catalog: Catalog, clock: Clock, keys: Keys | None = None,
                 options: LedgerOptions | None = None) -> None:
        self.redis = redis
        self.catalog = catalog
        self.clock = clock
        self.keys = keys or Keys()
        self.opt = options or LedgerOptions()
        self.scripts = Scripts(redis, functions=self.opt.functions,
                               quiet=catalog.quiet_meters)
        self._kind = {m: k.value for m, k in catalog.meters.items()}
        self.cluster = isinstance(redis, RedisClusterClient)
        if self.cluster:
            route_fcall_by_its_keys(redis)
        self._init_lock = asyncio.Lock()
        self._emeter = {m: escape(m) for m in catalog.meters}
        self.mux: Mux | ClusterMux | None = None
        if self.opt.pipeline:
            self.mux = ClusterMux.for_client(redis) if self.cluster else Mux.for_client(redis)

    async def aclose(self) -> None:
        """Close the spend path's own connection (the redis client is the caller's)."""
        if self.mux is not None:
            await self.mux.aclose()

    def _spend(self, name: str, keys: list[Any], args: list[Any]) -> Awaitable[Any]:
        """One spend-path script run: pipelined on the mux, else through redis-py."""
        execute = self.mux.execute if self.mux is not None else self.redis.execute_command
        return self.scripts.run(execute, name, keys, args)

    async def _ready(self) -> None:
        """A Redis Cluster client that has not found its cluster yet does so for one call
        at a time, the others waiting: redis-py 8.1's, first used by several calls at
        once, sometimes loses one of them on a connection it closes under it (in 200
        trials of 8 calls on a fresh client, 5 lost one; none once it was initialized).
        App.start's first health probe initializes it; this covers a cluster that was
        down when the sidecar started, and every other user of a Ledger."""
        async with self._init_lock:
            if getattr(self.redis, "_initialize", False):
                await self.redis.initialize()

    async def _call(self, aw: Awaitable[T]) -> T:
        try:
            if self.cluster and getattr(self.redis, "_initialize", False):
                try:
                    await self._ready()
                except BaseException:
                    close = getattr(aw, "close", None)  # the call never starts
                    if close is not None:
                        close()
                    raise
            return await aw
        except redis_errors.MaxConnectionsError as e:
            raise Unavailable("redis connection pool exhausted: more calls in flight than "
                              "connections (256 per Redis node and worker)") from e
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise Unavailable(f"redis unreachable: {e or type(e).__name__}") from e
        except (AttributeError, TypeError) as e:
            if not _closed_while_writing(e):
                raise
            # redis-py (8.1) lets a connection closed under a write escape as one of these
            # instead of ConnectionError (redis/redis-py#4287): the call did not reach Redis
            raise Unavailable("redis connection closed while sending") from e
        except redis_errors.ClusterDownError as e:
            raise Unavailable(f"redis cluster down: {e}") from e
        except redis_errors.TryAgainError as e:
            # a call that creates keys in a slot being migrated, after three tries: it
            # changed nothing, and succeeds once the migration is done
            raise Unavailable(f"redis cluster slot being migrated: {e}") from e
        except redis_errors.OutOfMemoryError as e:
            # Redis at maxmemory refuses a script before it writes anything
            raise Unavailable(f"redis is out of memory: {e}") from e

    # -- runtime operations ------------------------------------------------------------
    def _resolve(self, charges: Iterable[Charge], action: str, field: str,
                 allow_zero: bool = False) -> tuple[Charge, ...]:
        items = tuple(charges)
        if action:
            validate.ident(action, "action")
            if items:
                raise InvalidArgument("give either charges or action, not both", "action")
            priced = self.catalog.actions.get(action)
            if priced is None:
                raise InvalidArgument(f"unknown action {action!r}", "action")
            return priced
        return validate.charges(self.catalog, items, field, allow_zero)

    def _ttl_ms(self, ttl_seconds: int, field: str = "ttl_seconds") -> int:
        if ttl_seconds < 0 or ttl_seconds > self.opt.max_ttl_s:
            raise InvalidArgument(f"must be from 0 to {self.opt.max_ttl_s} (0: default)", field)
        return (ttl_seconds or self.opt.default_ttl_s) * 1000

    async def reserve(self, subject: Subject, charges: Iterable[Charge] = (), *,
                      idempotency_key: str, action: str = "", feature: str = "",
                      ttl_seconds: int = 0, allow_partial: bool = False,
                      labels: Mapping[str, str] | None = None) -> ReserveResult:
        validate.subject(subject)
        items = self._resolve(charges, action, "charges")
        validate.ident(idempotency_key, "idempotency_key")
        validate.ident(feature, "feature", required=False)
        if allow_partial and len(items) != 1:
            raise InvalidArgument("allow_partial needs exactly one charge", "allow_partial")
        ttl = self._ttl_ms(ttl_seconds)
        lbl = json.dumps(dict(sorted(labels.items())), separators=(",", ":")) \
            if labels else "{}"
        if len(lbl) > 4096:
            raise InvalidArgument("labels must be at most 4096 bytes as JSON", "labels")
        fingerprint = hashlib.sha256(json.dumps(
            [subject.org_id, subject.team_id, subject.seat_id, subject.assistant_id,
             [(c.meter, c.amount) for c in items], action, feature, ttl, allow_partial, lbl],
            separators=(",", ":")).encode()).hexdigest()[:32]
        # no labels: the hold and its ledger entries carry none ("{}" only in the fingerprint)
        reply = await self._run_reserve("R", subject, items, feature, action,
                                        lbl if labels else "", ttl, allow_partial,
                                        idempotency_key, fingerprint)
        _raise_if_error(reply)
        granted, at = _flat_charges(reply, 7)
        return ReserveResult(_decision(reply[1]), _reason(reply[2]), reply[3] == 1,
                             _s(reply[4]), granted, int(reply[5]),
                             _flat_balances(reply, at), reply[6] == 1)

    async def check(self, subject: Subject, meter: str = "", feature: str = "") -> CheckResult:
        validate.subject(subject)
        meter = meter or self.catalog.default_meter
        validate.meter(self.catalog, meter, "meter")
        validate.ident(feature, "feature", required=False)
        reply = await self._run_reserve("C", subject, (Charge(meter, 1),), feature, "", "",
                                        1000, False, "", "")
        return CheckResult(_decision(reply[1]) is Decision.GRANTED, _reason(reply[2]),
                           reply[3] == 1, _flat_balances(reply, 8))

    def _run_reserve(self, mode: str, s: Subject, items: Sequence[Charge], feature: str,
                     action: str, labels: str, ttl_ms: int, allow_partial: bool,
                     idem: str, fingerprint: str, rid: str = "") -> Awaitable[Any]:
        k = self.keys
        shard, pre, org_e = k.org_parts(s.org_id)
        cfg = cfg_key(pre, org_e)
        if mode == "R":
            rid = rid or self.new_reservation_id(shard)
            keys = [cfg, idem_key(pre, org_e, escape(idem)), hold_key(pre, rid),
                    k.expiries(shard), k.ledger(shard)]
        else:
            rid = ""
            keys = [cfg, cfg, cfg, k.expiries(shard), k.ledger(shard)]
        argv: list[Any] = [
            self.clock.now_ms(), mode, rid, ttl_ms, "1" if allow_partial else "0", fingerprint,
            self.opt.retain_ms, self.opt.ledger_maxlen, pre,
            escape(s.team_id), escape(s.seat_id), escape(s.assistant_id), escape(feature),
            escape(action), labels, len(items)]
        for c in items:
            em = self._emeter[c.meter]
            keys.append(bal_key(pre, org_e, em))
            argv += [em, self._kind[c.meter], c.amount]
        return self._call(self._spend("reserve", keys, argv))

    @staticmethod
    def new_reservation_id(shard: int) -> str:
        return f"r{shard}.{TOKENS.next()}"  # Keys.reservation_id

    def _hold_key(self, reservation_id: str) -> str:
        if not reservation_id:
            raise InvalidArgument("is required", "reservation_id")
        try:
            return self.keys.hold(reservation_id)
        except ValueError:
            raise InvalidArgument("is not a reservation id issued by quotagate",
                                  "reservation_id") from None

    def _amounts(self, items: Sequence[Charge] | None) -> list[Any]:
        if items is None:
            return [-1]
        out: list[Any] = [len(items)]
        for c in items:
            out += [self._emeter[c.meter], c.amount]
        return out

    async def commit(self, reservation_id: str, actual: Iterable[Charge] = (),
                     labels: Mapping[str, str] | None = None) -> HoldResult:
        """Charge what was used. Empty `actual`: charge exactly what was held; otherwise
        each meter of the hold is charged its `actual` amount (absent meters: 0)."""
        key = self._hold_key(reservation_id)
        items = validate.charges(self.catalog, actual, "actual", allow_zero=True,
                                 required=False)
        lbl = json.dumps(dict(sorted(labels.items())), separators=(",", ":")) if labels else ""
        reply = await self._commit_call(key, lbl, items or None)
        _raise_if_error(reply)
        return _hold_result(reply)

    def _commit_call(self, key: str, lbl: str, items: Sequence[Charge] | None) -> Awaitable[Any]:
        return self._call(self._spend("commit", keys=[key], args=[
            self.clock.now_ms(), self.opt.retain_ms, self.opt.ledger_maxlen, lbl,
            *self._amounts(items)]))

    async def charge_now(self, subject: Subject, charges: Sequence[Charge], *,
                         action: str = "", feature: str = "") -> ChargeResult:
        """Reserve and Commit in one go (Envoy's rate-limit calls): when every charge
        fits, exactly `charges` are charged and nothing stays held; otherwise nothing
        changes. `action` is recorded with the usage (the caller prices it). On the
        pipelined path the Reserve and its Commit go out back to back, one round trip:
        the reservation id is chosen here, so the Commit need not wait for the Reserve's
        answer. Should the Commit reach Redis first (a reconnect in between), it finds no
        hold and changes nothing, and it is sent again. Should the Commit be lost after
        the grant (Redis gone in between), the call answers UNAVAILABLE and the hold
        expires after CHARGE_HOLD_TTL_MS, charging nothing."""
        validate.subject(subject)
        items = validate.charges(self.catalog, charges, "charges")
        validate.ident(action, "action", required=False)
        validate.ident(feature, "feature", required=False)
        shard = self.keys.org_parts(subject.org_id)[0]
        rid = self.new_reservation_id(shard)
        key = self.keys.hold(rid)
        reserve = self._run_reserve("R", subject, items, feature, action, "",
                                    CHARGE_HOLD_TTL_MS, False, rid, rid, rid=rid)
        if self.mux is None:
            r_reply: Any = await reserve
            c_reply: Any = None
        else:
            both = await asyncio.gather(reserve, self._commit_call(key, "", None),
                                        return_exceptions=True)
            r_reply, c_reply = both
            if isinstance(r_reply, BaseException):
                raise r_reply
        _raise_if_error(r_reply)
        decision, reason, silent = _decision(r_reply[1]), _reason(r_reply[2]), r_reply[3] == 1
        if decision is not Decision.GRANTED:
            return ChargeResult(decision, reason, silent, (), _flat_balances(
                r_reply, _flat_charges(r_reply, 7)[1]))
        if isinstance(c_reply, BaseException):
            raise c_reply
        if c_reply is None or (_s(c_reply[0]) == "ERR" and _s(c_reply[1]) == "NOT_FOUND"):
            c_reply = await self._commit_call(key, "", None)  # it came before its hold
        _raise_if_error(c_reply)
        held = _hold_result(c_reply)
        return ChargeResult(decision, reason, silent, held.amounts, held.balances)

    async def refund(self, reservation_id: str, amount: Iterable[Charge] = (),
                     reason: str = "") -> HoldResult:
        """Give a hold back. Empty `amount`: everything (what is held, or what was
        charged); otherwise at most the given amounts of a committed hold."""
        key = self._hold_key(reservation_id)
        items = validate.charges(self.catalog, amount, "amount", required=False)
        if len(reason) > 1024:
            raise InvalidArgument("must be at most 1024 characters", "reason")
        reply = await self._call(self._spend("refund", keys=[key], args=[
            self.clock.now_ms(), self.opt.retain_ms, self.opt.ledger_maxlen, reason,
            *self._amounts(items or None)]))
        _raise_if_error(reply)
        amounts, at = _flat_charges(reply, 2)
        return HoldResult(_HOLD_STATE[reply[1]], amounts, _flat_balances(reply, at))

    async def extend(self, reservation_id: str, additional: Iterable[Charge] = (),
                     ttl_seconds: int = 0) -> ExtendResult:
        key = self._hold_key(reservation_id)
        items = validate.charges(self.catalog, additional, "additional", required=False)
        ttl = self._ttl_ms(ttl_seconds)
        reply = await self._call(self._spend("extend", keys=[key], args=[
            self.clock.now_ms(), ttl, self.opt.ledger_maxlen, *self._amounts(items)]))
        _raise_if_error(reply)
        if _s(reply[1]) == "G":
            return ExtendResult(Decision.GRANTED, DenyReason.NONE, False, _charges(reply[4]),
                                _i(reply[5]))
        return ExtendResult(Decision.DENIED, DenyReason(_s(reply[2])), bool(_i(reply[3])),
                            (), _i(reply[5]))

    async def get_balance(self, subject: Subject, meters: Iterable[str] = ()) -> \
            tuple[MeterBalance, ...]:
        validate.subject(subject)
        names = list(meters) or list(self.catalog.meters)
        for i, m in enumerate(names):
            validate.meter(self.catalog, m, f"meters[{i}]")
        k = self.keys
        shard, pre, _ = k.org_parts(subject.org_id)
        argv: list[Any] = [self.clock.now_ms(), escape(subject.team_id),
                           escape(subject.seat_id), escape(subject.assistant_id),
                           self.opt.retain_ms, self.opt.ledger_maxlen, pre, len(names)]
        keys = [k.cfg(subject.org_id), k.expiries(shard), k.ledger(shard)]
        for m in names:
            keys.append(k.bal(subject.org_id, m))
            argv += [self._emeter[m], self._kind[m]]
        reply = await self._call(self._spend("balance", keys, argv))
        _raise_if_error(reply)
        return _flat_balances(reply, 1)

    async def sweep_due(self, interval_ms: int, owner: str) -> int | None:
        """The background sweeper's tick, shared by a whole fleet: the first process to
        take the lease (`Keys.sweeper`, held for `interval_ms`) sweeps every shard; every
        other process skips. None: skipped. Reserve, Commit, Refund and Extend expire the
        holds they meet themselves, so a skipped or late sweep only delays the release of
        holds nobody touches. A sweeper that dies loses the lease when it expires."""
        took = await self._call(self.redis.set(self.keys.sweeper(), owner, nx=True,
                                               px=interval_ms))
        if not took:
            return None
        return await self.sweep_all()

    async def sweep(self, shard: int, limit: int | None = None) -> int:
        """Expire the shard's holds past their TTL; returns how many were looked at."""
        k = self.keys
        return int(await self._call(self.scripts.sweep(keys=[k.expiries(shard)], args=[
            self.clock.now_ms(), limit or self.opt.sweep_batch, self.opt.retain_ms,
            self.opt.ledger_maxlen, k.prefix(shard)])))

    async def sweep_all(self) -> int:
        """One pass of the sweeper over every shard: one script run per shard. On a
        single Redis they are all sent together, in one write on the pipelined
        connection. Without it (Redis Cluster, or the pipeline switched off) each script
        run takes a connection of redis-py's pool for itself, so at most SWEEP_IN_FLIGHT
        run at once: all 256 together filled a node's pool, and a Reserve, Commit or
        health probe arriving meanwhile failed at once with MaxConnectionsError
        (UNAVAILABLE; the health check flapped). Returns how many holds were looked at."""
        k, now = self.keys, self.clock.now_ms()
        gate = asyncio.Semaphore(SWEEP_IN_FLIGHT if self.mux is None else k.shards)

        async def one(s: int) -> Any:
            async with gate:
                return await self._spend("sweep", [k.expiries(s)], [
                    now, self.opt.sweep_batch, self.opt.retain_ms, self.opt.ledger_maxlen,
                    k.prefix(s)])

        async def run() -> int:
            counts = await asyncio.gather(*(one(s) for s in range(k.shards)))
            return sum(int(x) for x in counts)
        return await self._call(run())

    # -- configuration -----------------------------------------------------------------
    async def upsert_plan(self, name: str, allowances: Iterable[Allowance]) -> bool:
        """Create or replace a plan, then re-apply it to every org on it (at once, for the
        current period). Returns True when the plan is new."""
        validate.ident(name, "name")
        items = tuple(allowances)
        seen: set[str] = set()
        for i, a in enumerate(items):
            validate.meter(self.catalog, a.meter, f"allowances[{i}].meter")
            validate.amount(a.monthly, f"allowances[{i}].monthly", allow_zero=True)
            validate.amount(a.per_seat, f"allowances[{i}].per_seat", allow_zero=True)
            validate.amount(a.one_time, f"allowances[{i}].one_time", allow_zero=True)
            if a.meter in seen:
                raise InvalidArgument(f"meter {a.meter!r} appears twice",
                                      f"allowances[{i}].meter")
            seen.add(a.meter)
        fields = ["_", "1"]
        for a in items:
            fields += [a.meter, f"{a.monthly}:{a.per_seat}:{a.one_time}"]
        orgs = sorted(_s(o) for o in
                      await self._call(self.redis.smembers(self.keys.plan_orgs(name))))
        # Checked first, for every org: allowances that an org's allocation template no
        # longer fits are refused, and nothing changes (neither the plan nor any org).
        for org in orgs:
            try:
                await self._configure_org(org, name, None, 0, False, items, check_only=True)
            except FailedPrecondition as e:
                raise FailedPrecondition(f"org {org!r}: {e.message}", "allowances") from None
        created = bool(await self._call(self.scripts.plan(keys=[self.keys.plan(name)],
                                                          args=fields)))
        # and the orgs that joined the plan meanwhile (an UpsertOrg that read the plan
        # before it changed: it reads it again after joining, this covers the rest)
        orgs = sorted(set(orgs) | {_s(o) for o in await self._call(
            self.redis.smembers(self.keys.plan_orgs(name)))})
        kept: list[str] = []
        for org in orgs:
            # seats, anchor and ai are read inside the script: a concurrent UpsertOrg
            # is never overwritten with what they were a moment before
            try:
                await self._configure_org(org, name, None, 0, False, items)
            except FailedPrecondition:
                kept.append(org)  # changed since the check: that org is left as it is
        if kept:
            raise FailedPrecondition(
                f"the plan is saved, but org(s) {', '.join(map(repr, kept))} changed meanwhile "
                "and keep their previous grants: their allocation templates no longer fit; "
                "fix them and send UpsertPlan again", "allowances")
        return created

    async def plan(self, name: str) -> tuple[Allowance, ...] | None:
        raw = await self._call(self.redis.hgetall(self.keys.plan(name)))
        if not raw:
            return None
        out = []
        for m, v in raw.items():
            meter = _s(m)
            if meter == "_" or meter not in self.catalog.meters:
                continue
            monthly, per_seat, *once = _s(v).split(":")
            out.append(Allowance(meter, int(monthly), int(per_seat), int(once[0]) if once else 0))
        return tuple(out)

    async def upsert_org(self, org_id: str, plan: str, seats: int = 0,
                         period_anchor_day: int = 0, ai_enabled: bool = True) -> bool:
        validate.ident(org_id, "org_id")
        validate.ident(plan, "plan")
        validate.amount(seats, "seats", allow_zero=True)
        if not 0 <= period_anchor_day <= 28:
            raise InvalidArgument("must be from 1 to 28 (0: the default, 1)",
                                  "period_anchor_day")
        allowances = await self.plan(plan)
        if allowances is None:
            raise InvalidArgument(f"unknown plan {plan!r}", "plan")
        created = await self._configure_org(org_id, plan, seats, period_anchor_day or 1,
                                            ai_enabled, allowances)
        await self._call(self.redis.sadd(self.keys.plan_orgs(plan), org_id))
        # An UpsertPlan between the read above and the write may have re-applied its new
        # allowances to this org before this call wrote the old ones: read the plan again
        # (after the write and after joining the plan's orgs, so any later UpsertPlan
        # re-applies itself) and apply what changed, until a read finds what was written
        # (at most 10 times: a plan edited more often than that during one call is left
        # as its last re-apply or this call's last write has it).
        for _ in range(10):
            now = await self.plan(plan)
            if now is None or tuple(now) == tuple(allowances):
                break
            allowances = now
            await self._configure_org(org_id, plan, seats, period_anchor_day or 1,
                                      ai_enabled, allowances)
        return created

    async def _configure_org(self, org_id: str, plan: str, seats: int | None, anchor: int,
                             ai: bool, allowances: Sequence[Allowance],
                             check_only: bool = False) -> bool:
        """`seats` None: re-apply `plan` keeping the org's current seats, anchor and ai,
        only if it is still on that plan (decided inside the script). `check_only`: raise
        what the call would raise, and write nothing."""
        by_meter = {a.meter: a for a in allowances}
        k = self.keys
        keys = [k.cfg(org_id), k.ledger(k.shard_of(org_id))]
        argv: list[Any] = ["org", self.clock.now_ms(), self.opt.ledger_maxlen, escape(org_id),
                           escape(plan), "keep" if seats is None else seats, anchor,
                           "1" if ai else "0",
                           len(self.catalog.meters)]
        for m in self.catalog.meters:
            a = by_meter.get(m, Allowance(m))
            keys.append(k.bal(org_id, m))
            argv += [self._emeter[m], self._kind[m], a.monthly, a.per_seat, a.one_time]
        argv.append(",".join(str(t) for t in self.opt.low_thresholds))
        argv.append("1" if check_only else "0")
        reply = await self._call(self.scripts.configure(keys=keys, args=argv))
        _raise_if_error(reply)
        return bool(_i(reply[1]))

    async def _configure(self, org_id: str, op: str, *args: Any) -> bool:
        k = self.keys
        reply = await self._call(self.scripts.configure(
            keys=[k.cfg(org_id), k.ledger(k.shard_of(org_id))],
            args=[op, self.clock.now_ms(), self.opt.ledger_maxlen, escape(org_id), *args]))
        _raise_if_error(reply)
        return bool(_i(reply[1]))

    async def upsert_team(self, org_id: str, team_id: str, seats: int = 0) -> bool:
        validate.ident(org_id, "org_id")
        validate.ident(team_id, "team_id")
        validate.amount(seats, "seats", allow_zero=True)
        return await self._configure(org_id, "team", escape(team_id), seats)

    async def upsert_seat(self, org_id: str, seat_id: str, team_id: str = "",
                          limits: Iterable[SeatLimit] = ()) -> bool:
        validate.ident(org_id, "org_id")
        validate.ident(seat_id, "seat_id")
        validate.ident(team_id, "team_id", required=False)
        items = tuple(limits)
        args: list[Any] = [escape(seat_id), escape(team_id), len(items)]
        seen: set[str] = set()
        for i, lim in enumerate(items):
            validate.meter(self.catalog, lim.meter, f"limits[{i}].meter")
            if lim.meter in seen:
                raise InvalidArgument(f"meter {lim.meter!r} appears twice", f"limits[{i}].meter")
            seen.add(lim.meter)
            validate.amount(lim.monthly_limit, f"limits[{i}].monthly_limit", allow_zero=True)
            args += [self._emeter[lim.meter], lim.monthly_limit, "1" if lim.unlimited else "0"]
        return await self._configure(org_id, "seat", *args)

    async def upsert_assistant(self, org_id: str, assistant_id: str, team_id: str = "",
                               enabled: bool = True) -> bool:
        validate.ident(org_id, "org_id")
        validate.ident(assistant_id, "assistant_id")
        validate.ident(team_id, "team_id", required=False)
        return await self._configure(org_id, "assistant", escape(assistant_id),
                                     escape(team_id), "1" if enabled else "0")

    async def assistants(self, org_id: str) -> list[str]:
        """Ids of the org's registered assistants (enabled or not), sorted."""
        validate.ident(org_id, "org_id")
        fields = await self.redis.hkeys(self.keys.cfg(org_id))
        return sorted(unescape(f[3:]) for f in map(_s, fields) if f.startswith("as:"))

    async def set_feature(self, org_id: str, feature: str, enabled: bool,
                          team_id: str = "") -> bool:
        validate.ident(org_id, "org_id")
        validate.ident(feature, "feature")
        validate.ident(team_id, "team_id", required=False)
        return await self._configure(org_id, "feature", escape(team_id), escape(feature),
                                     "1" if enabled else "0")

    async def topup(self, org_id: str, meter: str, amount: int, purchase_id: str,
                    team_id: str = "", seat_id: str = "") -> TopUpResult:
        validate.ident(org_id, "org_id")
        kind = validate.meter(self.catalog, meter, "meter")
        validate.amount(amount, "amount")
        validate.ident(purchase_id, "purchase_id")
        validate.ident(team_id, "team_id", required=False)
        validate.ident(seat_id, "seat_id", required=False)
        k = self.keys
        shard = k.shard_of(org_id)
        reply = await self._call(self.scripts.topup(
            keys=[k.cfg(org_id), k.bal(org_id, meter), k.purchases(org_id), k.ledger(shard)],
            args=[self.clock.now_ms(), escape(purchase_id), amount, escape(team_id),
                  escape(seat_id), self._emeter[meter], kind.value, self.opt.ledger_maxlen,
                  escape(org_id)]))
        _raise_if_error(reply)
        return TopUpResult(bool(_i(reply[1])), _balance(reply[2]))

    # -- money movement and wallet settings (issue 4) -------------------------------------
    async def _move(self, op: str, org_id: str, meter: str, idempotency_key: str,
                    fingerprint: list[Any], *args: Any) -> tuple[bool, tuple[MeterBalance, ...]]:
        k = self.keys
        fp = hashlib.sha256(json.dumps([op, org_id, meter, *fingerprint],
                                       separators=(",", ":")).encode()).hexdigest()[:32]
        reply = await self._call(self.scripts.transfer(
            keys=[k.cfg(org_id), k.bal(org_id, meter), k.idem(org_id, f"{op}:{idempotency_key}"),
                  k.ledger(k.shard_of(org_id)), k.expiries(k.shard_of(org_id))],
            args=[op, self.clock.now_ms(), self._emeter[meter], self._kind[meter], fp,
                  ADMIN_RETAIN_MS, self.opt.ledger_maxlen, self.opt.retain_ms, *args]))
        _raise_if_error(reply)
        return bool(_i(reply[1])), tuple(_balance(b) for b in reply[2])

    async def transfer(self, org_id: str, meter: str, amount: int, bucket: str, *,
                       idempotency_key: str, from_team_id: str = "", from_seat_id: str = "",
                       to_team_id: str = "", to_seat_id: str = "") -> tuple[MeterBalance, ...]:
        """Move `amount` of the `monthly` or `topup` bucket between two wallets of an org.
        Returns the source's and the destination's own balances."""
        validate.ident(org_id, "org_id")
        validate.meter(self.catalog, meter, "meter")
        validate.amount(amount, "amount")
        if bucket not in ("monthly", "topup"):
            raise InvalidArgument("must be BUCKET_MONTHLY or BUCKET_TOPUP", "bucket")
        for name, v in (("from_team_id", from_team_id), ("from_seat_id", from_seat_id),
                        ("to_team_id", to_team_id), ("to_seat_id", to_seat_id)):
            validate.ident(v, name, required=False)
        validate.ident(idempotency_key, "idempotency_key")
        ids = [from_team_id, from_seat_id, to_team_id, to_seat_id]
        _, balances = await self._move(
            "transfer", org_id, meter, idempotency_key, [*ids, amount, bucket],
            *(escape(x) for x in ids), amount, bucket[0])
        return balances

    async def adjust(self, org_id: str, meter: str, delta: int, reason: str, *,
                     idempotency_key: str) -> tuple[MeterBalance, ...]:
        """Correct the org wallet: +delta into top-up (pays debt first), -delta out of it
        in burn order (what is not there becomes debt)."""
        validate.ident(org_id, "org_id")
        validate.meter(self.catalog, meter, "meter")
        if delta == 0:
            raise InvalidArgument("must not be 0", "delta")
        validate.amount(abs(delta), "delta")
        if not reason or len(reason) > 1024:
            raise InvalidArgument("is required, at most 1024 characters", "reason")
        validate.ident(idempotency_key, "idempotency_key")
        _, balances = await self._move("adjust", org_id, meter, idempotency_key,
                                       [delta, reason], delta, reason)
        return balances

    async def set_allocation_template(self, org_id: str, meter: str, mode: str,
                                      per_seat: int = 0,
                                      custom: Mapping[str, int] | None = None) -> dict[str, int]:
        """mode: '' (remove), 'per_seat', 'even' or 'custom'. Returns team -> allocation."""
        validate.ident(org_id, "org_id")
        kind = validate.meter(self.catalog, meter, "meter")
        if mode not in ("", "per_seat", "even", "custom"):
            raise InvalidArgument("unknown allocation mode", "mode")
        validate.amount(per_seat, "per_seat", allow_zero=True)
        args: list[Any] = [self._emeter[meter], kind.value, mode, per_seat,
                           len(custom or {})]
        for team, amt in sorted((custom or {}).items()):
            validate.ident(team, "custom")
            validate.amount(amt, f"custom[{team}]", allow_zero=True)
            args += [escape(team), amt]
        k = self.keys
        reply = await self._call(self.scripts.configure(
            keys=[k.cfg(org_id), k.ledger(k.shard_of(org_id))],
            args=["template", self.clock.now_ms(), self.opt.ledger_maxlen, escape(org_id),
                  *args]))
        _raise_if_error(reply)
        flat = reply[2]
        return {unescape(_s(flat[i])): _i(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def set_overage(self, org_id: str, meter: str, cap: int, unit_price_micros: int = 0,
                          bill_every_micros: int = 0) -> None:
        validate.ident(org_id, "org_id")
        kind = validate.meter(self.catalog, meter, "meter")
        validate.amount(cap, "cap", allow_zero=True)
        validate.amount(unit_price_micros, "unit_price_micros", allow_zero=True)
        validate.amount(bill_every_micros, "bill_every_micros", allow_zero=True)
        await self._configure(org_id, "overage", self._emeter[meter], kind.value, cap,
                              unit_price_micros, bill_every_micros)

    async def set_auto_topup(self, org_id: str, meter: str, threshold: int, amount: int,
                             enabled: bool = True, cooldown_seconds: int = 0,
                             max_per_period: int = 0) -> None:
        validate.ident(org_id, "org_id")
        kind = validate.meter(self.catalog, meter, "meter")
        validate.amount(threshold, "threshold")
        validate.amount(amount, "amount")
        if not 0 <= cooldown_seconds <= 366 * 86400:
            raise InvalidArgument("must be from 0 to one year", "cooldown_seconds")
        if max_per_period < 0:
            raise InvalidArgument("must not be negative", "max_per_period")
        await self._configure(org_id, "autotopup", self._emeter[meter], kind.value, threshold,
                              amount, "1" if enabled else "0", cooldown_seconds * 1000,
                              max_per_period)

    async def ping(self) -> bool:
        try:
            if self.cluster and getattr(self.redis, "_initialize", False):
                await self._ready()
            return bool(await self.redis.ping())
        except (redis_errors.RedisError, OSError):
            return False


__all__ = ["Ledger", "LedgerOptions", "MeterKind", "NotFound"]
