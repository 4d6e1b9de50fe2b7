"""A hypothesis state machine drives Reserve / Commit / Refund / Extend / expiry / TopUp /
period changes against the real Lua scripts on a real Redis, and against a pure-Python
model of the wallets. After every step: every balance equals the model's, no limit is
exceeded, no bucket is negative, and every hold is resolved at most once."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from cluster_server import RedisCluster
from conftest import CLUSTER
from quotagate import catalog
from quotagate.clock import ManualClock
from quotagate.errors import FailedPrecondition
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import (
    Allowance,
    Charge,
    Decision,
    HoldState,
    SeatLimit,
    Subject,
)
from quotagate.ledger.store import Ledger, LedgerOptions
from redis_server import RedisServer

M = "message_tokens"
MONTHLY = 1_000
SEAT_CAP = 700
OVERAGE_CAP = 300
TTL_S = 60
T0 = int(dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp() * 1000)

ORG = Subject("org")
SEAT = Subject("org", seat_id="s1")  # seat s1 in team t1: chain seat -> team -> org
SUBJECTS = {"org": ORG, "seat": SEAT}


def period_id(now_ms: int) -> int:
    d = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    return d.year * 12 + d.month - 1


@dataclass
class Wallet:
    p: int = -1
    mg: int = 0
    mu: int = 0
    mh: int = 0
    tb: int = 0
    th: int = 0
    tu: int = 0
    cu: int = 0
    ch: int = 0
    mx: int = 0
    ou: int = 0
    oh: int = 0
    dpm: int = 0  # org: debt paid from this period's monthly tokens
    dpt: int = 0  # org: debt paid from top-up in this period

    def avail_m(self) -> int:
        return max(0, self.mg - self.mu - self.mh)

    def avail_t(self) -> int:
        return max(0, self.tb - self.th)


@dataclass
class Hold:
    rid: str
    chain: tuple[str, ...]
    g: int
    takes: list[list[int | str]]
    exp: int
    hp: int
    state: str = "H"
    late: bool = False
    charged: int = 0
    xtakes: list[list[int | str]] = field(default_factory=list)
    cp: int = -1  # the period its Commit counted the usage in (seat cap, overage)


class Model:
    """The wallets as DESIGN §3 describes them, written independently of the Lua."""

    def __init__(self, now: int) -> None:
        self.w = {"S": Wallet(), "T": Wallet(), "O": Wallet()}
        self.d = 0
        self.holds: dict[str, Hold] = {}
        self.roll(now)

    def roll(self, now: int) -> None:
        pid = period_id(now)
        for lvl, w in self.w.items():
            if w.p != pid:
                w.p, w.mu, w.mh, w.tu, w.cu, w.ch = pid, 0, 0, 0, 0, 0
                w.mx, w.ou, w.oh, w.dpm, w.dpt = 0, 0, 0, 0, 0
                w.mg = MONTHLY if lvl == "O" else 0
        self.settle()

    def settle(self) -> None:
        o = self.w["O"]
        x = min(self.d, o.avail_m())
        o.mu += x
        o.dpm += x
        self.d -= x
        y = min(self.d, o.avail_t())
        o.tb -= y
        o.tu += y
        o.dpt += y
        self.d -= y

    def avail_o(self) -> int:
        o = self.w["O"]
        return max(0, OVERAGE_CAP - o.ou - o.oh)

    def avail(self, chain: tuple[str, ...]) -> int:
        return sum(self.w[lvl].avail_m() + self.w[lvl].avail_t() for lvl in chain) \
            + self.avail_o()

    def room(self, chain: tuple[str, ...]) -> int:
        if chain[0] != "S":
            return -1
        return max(0, SEAT_CAP - self.w["S"].cu - self.w["S"].ch)

    def release_all(self, h: Hold, state: str) -> None:
        for code, pid, amt in h.takes:
            w = self.w[str(code)[0]]
            if str(code)[1] == "m":
                if w.p == pid:
                    w.mh -= int(amt)
            elif str(code)[1] == "o":
                if w.p == pid:
                    w.oh -= int(amt)
            else:
                w.th -= int(amt)
        if h.chain[0] == "S" and self.w["S"].p == h.hp:
            self.w["S"].ch -= h.g
        h.state = state

    def expire_due(self, now: int, limit: int) -> int:
        due = sorted((h.exp, h.rid) for h in self.holds.values()
                     if h.state == "H" and h.exp <= now)
        for _, rid in due[:limit]:
            self.release_all(self.holds[rid], "E")
        return len(due[:limit])

    def reserve(self, now: int, who: str, amount: int, partial: bool) -> int:
        """What Reserve grants. Holds past their TTL are released (8 at most, the
        shard's oldest first) only when the request would not be granted in full."""
        def decide() -> int:
            self.roll(now)
            chain = ("S", "T", "O") if who == "seat" else ("O",)
            avail, room = self.avail(chain), self.room(chain)
            can = min(avail, room) if room >= 0 else avail
            if can >= amount:
                return amount
            if partial and can > 0:
                return can
            return 0

        got = decide()
        if got < amount and self.expire_due(now, 8):
            got = decide()
        return got

    def hold(self, now: int, rid: str, who: str, amount: int) -> None:
        chain = ("S", "T", "O") if who == "seat" else ("O",)
        takes: list[list[int | str]] = []
        left = amount
        for lvl in chain:
            w = self.w[lvl]
            x = min(left, w.avail_m())
            if x:
                w.mh += x
                left -= x
                takes.append([lvl + "m", w.p, x])
            y = min(left, w.avail_t())
            if y:
                w.th += y
                left -= y
                takes.append([lvl + "t", w.p, y])
        z = min(left, self.avail_o())
        if z:
            self.w["O"].oh += z
            left -= z
            takes.append(["Oo", self.w["O"].p, z])
        assert left == 0
        if chain[0] == "S":
            self.w["S"].ch += amount
        self.holds[rid] = Hold(rid, chain, amount, takes, now + TTL_S * 1000, self.w["O"].p)

    def charge_free(self, chain: tuple[str, ...], amount: int) -> list[list[int | str]]:
        takes: list[list[int | str]] = []
        left = amount
        for lvl in chain:
            w = self.w[lvl]
            x = min(left, w.avail_m())
            if x:
                w.mu += x
                left -= x
                takes.append([lvl + "m", w.p, x])
            y = min(left, w.avail_t())
            if y:
                w.tb -= y
                w.tu += y
                left -= y
                takes.append([lvl + "t", w.p, y])
        z = min(left, self.avail_o())
        if z:
            self.w["O"].ou += z
            left -= z
            takes.append(["Oo", self.w["O"].p, z])
        if left:
            self.d += left
            takes.append(["D", 0, left])
        return takes

    def commit(self, now: int, rid: str, actual: int | None) -> tuple[str, int]:
        h = self.holds[rid]
        self.roll(now)
        if h.state == "H" and now >= h.exp:
            self.release_all(h, "E")
            # what the expired hold gave back is a refill: it pays debt first, before
            # the late usage is charged
            self.settle()
        if h.state in ("C", "R"):
            self.settle()
            return h.state, h.charged
        a = h.g if actual is None else actual
        left = a
        charged: list[list[int | str]] = []
        if h.state == "H":
            for code, pid, amt in h.takes:
                w = self.w[str(code)[0]]
                x = min(left, int(amt))
                if x:
                    if str(code)[1] == "m":
                        if w.p == pid:
                            w.mh -= x
                            w.mu += x
                    elif str(code)[1] == "o":
                        if w.p == pid:
                            w.oh -= x
                        w.ou += x
                    else:
                        w.th -= x
                        w.tb -= x
                        if w.p == pid:
                            w.tu += x
                    charged.append([code, pid, x])
                    left -= x
                rest = int(amt) - x
                if rest:
                    if str(code)[1] == "m":
                        if w.p == pid:
                            w.mh -= rest
                    elif str(code)[1] == "o":
                        if w.p == pid:
                            w.oh -= rest
                    else:
                        w.th -= rest
            if h.chain[0] == "S":
                s = self.w["S"]
                if s.p == h.hp:
                    s.ch -= h.g
                s.cu += a
        else:  # a late Commit after expiry: the usage happened and is recorded
            h.late = True
            if h.chain[0] == "S":
                self.w["S"].cu += a
        if left:
            charged += self.charge_free(h.chain, left)
        h.state, h.charged, h.xtakes, h.cp = "C", a, charged, self.w["O"].p
        self.settle()
        return "C", a

    def refund(self, now: int, rid: str, amount: int | None) -> tuple[str, int]:
        h = self.holds[rid]
        self.roll(now)
        if h.state == "H" and now >= h.exp:
            self.release_all(h, "E")
        if h.state == "E":
            return "E", 0
        if h.state == "R":
            return "R", getattr(h, "refunded", 0)
        if h.state == "H":
            self.release_all(h, "R")
            h.refunded = h.g  # type: ignore[attr-defined]
            self.settle()
            return "R", h.g
        x = h.charged if amount is None else min(h.charged, amount)
        left = x
        rank = {"Sm": 1, "St": 2, "Tm": 3, "Tt": 4, "Om": 5, "Ot": 6, "Oo": 7, "D": 8}
        order = sorted(h.xtakes, key=lambda t: (rank[str(t[0])], int(t[1])), reverse=True)
        settled = 0  # refunded debt that a refill had paid: given back after the rest
        for code, pid, amt in order:
            y = min(left, int(amt))
            if y:
                if code == "D":
                    fromd = min(self.d, y)
                    self.d -= fromd
                    settled += y - fromd
                else:
                    w = self.w[str(code)[0]]
                    if str(code)[1] == "m":
                        if w.p == pid:
                            w.mu -= y
                    elif str(code)[1] == "o":
                        if w.p == h.cp:  # counted where it was committed
                            w.ou = max(0, w.ou - y)
                    else:
                        w.tb += y
                        if w.p == pid:
                            w.tu -= y
                left -= y
        if settled:  # undo the refill's payment: what this period's top-up paid, then
            # what its monthly tokens paid; an earlier period's payment comes back as top-up
            o = self.w["O"]
            back = min(settled, o.dpt, o.tu)
            o.tu -= back
            o.dpt -= back
            o.tb += back
            settled -= back
            back = min(settled, o.dpm, o.mu)
            o.mu -= back
            o.dpm -= back
            o.tb += settled - back
        if x and h.chain[0] == "S" and self.w["S"].p == h.cp:
            self.w["S"].cu = max(0, self.w["S"].cu - x)
        h.state = "R"
        h.refunded = x  # type: ignore[attr-defined]
        self.settle()
        return "R", x

    def extend(self, now: int, rid: str, add: int) -> bool:
        h = self.holds[rid]
        self.roll(now)
        if h.state != "H" or now >= h.exp:
            return False
        avail, room = self.avail(h.chain), self.room(h.chain)
        if avail < add or (room >= 0 and room < add):
            return False
        before = Hold(rid, h.chain, 0, [], 0, 0)
        self.w_hold_more(h, add, before)
        h.exp = now + TTL_S * 1000
        return True

    def w_hold_more(self, h: Hold, add: int, scratch: Hold) -> None:
        left = add
        for lvl in h.chain:
            w = self.w[lvl]
            for kind in "mt":
                x = min(left, w.avail_m() if kind == "m" else w.avail_t())
                if not x:
                    continue
                if kind == "m":
                    w.mh += x
                else:
                    w.th += x
                left -= x
                for t in h.takes:
                    if t[0] == lvl + kind and t[1] == w.p:
                        t[2] = int(t[2]) + x
                        break
                else:
                    h.takes.append([lvl + kind, w.p, x])
        z = min(left, self.avail_o())
        if z:
            o = self.w["O"]
            o.oh += z
            for t in h.takes:
                if t[0] == "Oo" and t[1] == o.p:
                    t[2] = int(t[2]) + z
                    break
            else:
                h.takes.append(["Oo", o.p, z])
        if h.chain[0] == "S":
            s = self.w["S"]
            if s.p != h.hp:  # held since an earlier period: all of it counts here now
                s.ch += h.g
                h.hp = s.p
            s.ch += add
        h.g += add

    def view(self, chain: tuple[str, ...]) -> dict[str, int]:
        ws = [self.w[lvl] for lvl in chain]
        mg = sum(w.mg for w in ws)
        mu = sum(w.mu for w in ws)
        tb = sum(w.tb for w in ws)
        tu = sum(w.tu for w in ws)
        remaining = self.avail(chain)
        room = self.room(chain)
        if 0 <= room < remaining:
            remaining = room
        o = self.w["O"]
        return {"used": mu + tu + o.ou + self.d, "total": mg + tb + tu, "remaining": remaining,
                "reserved": sum(w.mh + w.th for w in ws) + o.oh, "monthly_granted": mg,
                "monthly_used": mu, "topup_remaining": tb, "debt": self.d,
                "overage_used": o.ou, "overage_cap": OVERAGE_CAP}

    def transfer(self, src: str, dst: str, bucket: str, amount: int) -> bool:
        a, b = self.w[src], self.w[dst]
        free = a.avail_m() if bucket == "monthly" else a.avail_t()
        if free < amount:
            return False
        if bucket == "monthly":
            a.mg -= amount
            a.mx += amount
            b.mg += amount
            b.mx -= amount
        else:
            a.tb -= amount
            b.tb += amount
        self.settle()
        return True


class LedgerMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = LOOP
        self.counter = itertools.count()
        self.committed: list[str] = []

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @initialize()
    def setup(self) -> None:
        self.clock = ManualClock(T0)
        self.ledger = Ledger(REDIS, catalog.load(None).catalog, self.clock, Keys(16),
                             LedgerOptions(default_ttl_s=TTL_S))

        async def go() -> None:
            if CLUSTER:
                await REDIS.flushall(target_nodes=aiocluster.RedisCluster.PRIMARIES)
            else:
                await REDIS.flushall()
            await self.ledger.upsert_plan("p", [Allowance(M, MONTHLY)])
            await self.ledger.upsert_org("org", "p")
            await self.ledger.upsert_team("org", "t1")
            await self.ledger.upsert_seat("org", "s1", "t1", [SeatLimit(M, SEAT_CAP)])
            await self.ledger.set_overage("org", M, OVERAGE_CAP)
        self.run(go())
        self.model = Model(T0)
        self.resolved: dict[str, int] = {}

    @rule(target=holds, who=st.sampled_from(["org", "seat"]),
          amount=st.integers(1, 900), partial=st.booleans())
    def reserve(self, who: str, amount: int, partial: bool) -> str:
        key = f"k{next(self.counter)}"
        r = self.run(self.ledger.reserve(SUBJECTS[who], [Charge(M, amount)],
                                         idempotency_key=key, allow_partial=partial))
        expect = self.model.reserve(self.clock.now_ms(), who, amount, partial)
        if expect:
            assert r.decision is Decision.GRANTED, (who, amount, r)
            assert r.granted == (Charge(M, expect),)
            self.model.hold(self.clock.now_ms(), r.reservation_id, who, expect)
            return r.reservation_id
        assert r.decision is Decision.DENIED, (who, amount, r)
        return ""

    @rule(who=st.sampled_from(["org", "seat"]), amount=st.integers(1, 900))
    def charge_now(self, who: str, amount: int) -> None:
        """Envoy's ShouldRateLimit: Reserve and Commit at once, as the model does them
        one after the other."""
        r = self.run(self.ledger.charge_now(SUBJECTS[who], [Charge(M, amount)]))
        now = self.clock.now_ms()
        expect = self.model.reserve(now, who, amount, False)
        if expect:
            assert r.decision is Decision.GRANTED and r.charged == (Charge(M, amount),), r
            rid = f"now-{next(self.counter)}"
            self.model.hold(now, rid, who, amount)
            assert self.model.commit(now, rid, None) == ("C", amount)
        else:
            assert r.decision is Decision.DENIED and r.charged == (), (who, amount, r)

    @rule(rid=consumes(holds), actual=st.none() | st.integers(0, 1200))
    def commit(self, rid: str, actual: int | None) -> None:
        if not rid:
            return
        res = self.run(self.ledger.commit(rid, [] if actual is None else [Charge(M, actual)]))
        state, charged = self.model.commit(self.clock.now_ms(), rid, actual)
        assert res.state is {"C": HoldState.COMMITTED, "R": HoldState.REFUNDED}[state]
        if state == "C":
            assert res.amounts == (Charge(M, charged),)
            # Committing again answers the same and charges nothing more.
            again = self.run(self.ledger.commit(rid, [Charge(M, 1)]))
            assert again.state is HoldState.COMMITTED and again.amounts == res.amounts
            self.committed.append(rid)

    @rule(rid=consumes(holds))
    def refund_held(self, rid: str) -> None:
        if not rid:
            return
        res = self.run(self.ledger.refund(rid))
        state, amount = self.model.refund(self.clock.now_ms(), rid, None)
        assert res.state is {"R": HoldState.REFUNDED, "E": HoldState.EXPIRED}[state]
        if state == "R":
            assert res.amounts == (Charge(M, amount),)

    @precondition(lambda self: bool(self.committed))
    @rule(data=st.data(), partial=st.none() | st.integers(1, 1500))
    def refund_committed(self, data: st.DataObject, partial: int | None) -> None:
        rid = data.draw(st.sampled_from(self.committed))
        self.committed.remove(rid)
        res = self.run(self.ledger.refund(rid, [] if partial is None else [Charge(M, partial)]))
        state, amount = self.model.refund(self.clock.now_ms(), rid, partial)
        assert state == "R" and res.state is HoldState.REFUNDED
        assert res.amounts == (Charge(M, amount),)

    @rule(rid=holds, add=st.integers(1, 300))
    def extend(self, rid: str, add: int) -> None:
        if not rid or self.model.holds[rid].state != "H":
            return
        if self.clock.now_ms() >= self.model.holds[rid].exp:
            return
        res = self.run(self.ledger.extend(rid, [Charge(M, add)], TTL_S))
        ok = self.model.extend(self.clock.now_ms(), rid, add)
        assert (res.decision is Decision.GRANTED) == ok, (rid, add, res)

    @rule(target_=st.sampled_from(["org", "team", "seat"]), amount=st.integers(1, 800))
    def topup(self, target_: str, amount: int) -> None:
        pid = f"p{next(self.counter)}"
        team, seat = {"org": ("", ""), "team": ("t1", ""), "seat": ("", "s1")}[target_]
        r = self.run(self.ledger.topup("org", M, amount, pid, team, seat))
        assert r.applied
        self.model.roll(self.clock.now_ms())
        self.model.w[{"org": "O", "team": "T", "seat": "S"}[target_]].tb += amount
        self.model.settle()
        # The same purchase again changes nothing.
        assert not self.run(self.ledger.topup("org", M, amount, pid, team, seat)).applied

    @rule(src=st.sampled_from("OTS"), dst=st.sampled_from("OTS"),
          bucket=st.sampled_from(["monthly", "topup"]), amount=st.integers(1, 600))
    def transfer(self, src: str, dst: str, bucket: str, amount: int) -> None:
        if src == dst:
            return
        where = {"O": {}, "T": {"team_id": "t1"}, "S": {"seat_id": "s1"}}
        kw = {f"from_{k}": v for k, v in where[src].items()}
        kw |= {f"to_{k}": v for k, v in where[dst].items()}
        key = f"x{next(self.counter)}"
        self.model.roll(self.clock.now_ms())
        if self.model.expire_due(self.clock.now_ms(), 8):  # a Transfer releases them
            self.model.settle()  # first; what came back pays debt first
        ok = self.model.transfer(src, dst, bucket, amount)
        try:
            self.run(self.ledger.transfer("org", M, amount, bucket, idempotency_key=key, **kw))
            assert ok, (src, dst, bucket, amount)
        except FailedPrecondition:
            assert not ok, (src, dst, bucket, amount)

    @rule(seconds=st.sampled_from([1, 30, 61, 3600, 20 * 86400]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds * 1000)

    @rule()
    def sweep(self) -> None:
        n = self.run(self.ledger.sweep(self.ledger.keys.shard_of("org"), 100))
        self.model.roll(self.clock.now_ms())
        self.model.expire_due(self.clock.now_ms(), 100)
        assert n >= 0

    def teardown(self) -> None:
        if hasattr(self, "ledger"):
            self.run(self.ledger.aclose())

    @invariant()
    def balances_match_model(self) -> None:
        if not hasattr(self, "model"):
            return
        now = self.clock.now_ms()
        for who, chain in (("org", ("O",)), ("seat", ("S", "T", "O"))):
            (b,) = self.run(self.ledger.get_balance(SUBJECTS[who], [M]))
            self.model.roll(now)
            if self.model.expire_due(now, 8):  # GetBalance releases them first, as Reserve
                self.model.settle()  # would; what came back pays debt first
            want = self.model.view(chain)
            got = {k: getattr(b, k) for k in want}
            assert got == want, (who, got, want)
            assert b.remaining >= 0 and b.reserved >= 0 and b.monthly_used <= b.monthly_granted
        for w in self.model.w.values():
            assert min(w.mu, w.mh, w.tb, w.th, w.tu, w.cu, w.ch) >= 0
        # Monthly tokens are never granted beyond the plan, nor seat tokens beyond the cap.
        # Only usage reported after the fact (a Commit above its hold, or a late Commit of
        # an expired hold) may pass the cap: it happened, so it is recorded.
        o, s = self.model.w["O"], self.model.w["S"]
        assert o.mu + o.mh <= o.mg
        assert o.oh + o.ou <= OVERAGE_CAP or any(
            h.charged > h.g or h.late for h in self.model.holds.values())
        assert s.cu + s.ch <= SEAT_CAP or any(
            h.charged > h.g or h.late for h in self.model.holds.values())


LOOP: asyncio.AbstractEventLoop
REDIS: aioredis.Redis


@pytest.fixture(scope="module")
def machine_env():  # type: ignore[no-untyped-def]
    global LOOP, REDIS
    srv: Any = RedisCluster().start() if CLUSTER else RedisServer().start()
    LOOP = asyncio.new_event_loop()
    REDIS = (aiocluster.RedisCluster.from_url(srv.seed_url) if CLUSTER
             else aioredis.Redis.from_url(srv.url))
    yield
    LOOP.run_until_complete(REDIS.aclose())
    LOOP.close()
    srv.close()


@pytest.mark.timeout(600)
def test_wallets_match_model(machine_env: None) -> None:
    LedgerMachine.TestCase.settings = settings(
        # QG_EXAMPLES=2000 (say) searches longer than the suite does
        max_examples=int(os.environ.get("QG_EXAMPLES", "200")), stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    LedgerMachine.TestCase().runTest()
