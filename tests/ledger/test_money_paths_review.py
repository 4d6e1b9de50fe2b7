"""Money paths with less testing: Transfer, TopUp, allocation templates, and Refund /
Extend / Commit of a hold made in one billing period and resolved in the next; and a
state machine that checks tokens are conserved across them."""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from conftest import CLUSTER, T0, ms
from quotagate import catalog
from quotagate.clock import ManualClock
from quotagate.errors import FailedPrecondition, InvalidArgument
from quotagate.ledger import wallet
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

M = "message_tokens"
DAY_S = 86_400


async def bal(ledger: Ledger, s: Subject) -> Any:
    return (await ledger.get_balance(s, [M]))[0]


# -- a refused call changes nothing -------------------------------------------------------

@pytest.mark.parametrize("refused", ["transfer", "topup", "extend"])
async def test_refused_call_at_a_periods_first_touch_does_not_record_a_debt_payment(
        ledger: Ledger, clock: ManualClock, refused: str) -> None:
    """Debt waits for December's tokens; December's first call is refused. What pays the
    debt must be recorded once (by the call that saves the payment), or a Refund of the
    usage that became debt later returns tokens to the wrong bucket."""
    clock.set(ms(2026, 11, 30, 12))
    await ledger.upsert_plan("small", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_team("o", "t")
    await ledger.set_overage("o", M, 50)
    org = Subject("o")
    a = await ledger.reserve(org, [Charge(M, 1_000)], idempotency_key="a")
    h = await ledger.reserve(org, [Charge(M, 50)], idempotency_key="h", ttl_seconds=DAY_S)
    assert a.decision is h.decision is Decision.GRANTED
    c = await ledger.commit(a.reservation_id, [Charge(M, 1_300)])  # 300 past: debt
    assert c.balances[0].debt == 300
    await ledger.topup("o", M, 100, "p1")  # November's top-up pays 100 of it
    assert (await bal(ledger, org)).debt == 200

    clock.set(ms(2026, 12, 1, 1))  # December: its monthly tokens pay the other 200
    if refused == "transfer":
        with pytest.raises(FailedPrecondition):
            await ledger.transfer("o", M, 5_000, "monthly", idempotency_key="x",
                                  to_team_id="t")
    elif refused == "topup":
        with pytest.raises(InvalidArgument):
            await ledger.topup("o", M, 7, "p1")  # the purchase id of another top-up
    else:
        e = await ledger.extend(h.reservation_id, [Charge(M, 1_000_000)], 60)
        assert e.decision is Decision.DENIED
    b = await bal(ledger, org)
    assert (b.debt, b.monthly_used) == (0, 200)
    u = await ledger.reserve(org, [Charge(M, 300)], idempotency_key="u")
    await ledger.commit(u.reservation_id)
    assert (await bal(ledger, org)).monthly_used == 500

    r = await ledger.refund(a.reservation_id)
    assert r.state is HoldState.REFUNDED and r.amounts == (Charge(M, 1_300),)
    after = await bal(ledger, org)
    # December's 200 go back to December's monthly pool; November's 100 (a top-up) come
    # back as top-up; December's own 300 stay used
    assert (after.monthly_used, after.topup_remaining, after.debt) == (300, 100, 0)


# -- a hold made in one period, resolved in the next ---------------------------------------

async def test_refund_in_the_next_period_of_a_commit_made_there_gives_the_seat_cap_back(
        ledger: Ledger, clock: ManualClock) -> None:
    clock.set(ms(2026, 11, 30, 20))
    await ledger.upsert_plan("small", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 700)])
    seat = Subject("o", seat_id="s")
    h = await ledger.reserve(seat, [Charge(M, 500)], idempotency_key="h", ttl_seconds=DAY_S)
    assert h.decision is Decision.GRANTED
    clock.set(ms(2026, 12, 1, 1))
    c = await ledger.commit(h.reservation_id)
    assert c.state is HoldState.COMMITTED
    assert (await bal(ledger, seat)).remaining == 200  # the usage counts in December
    r = await ledger.refund(h.reservation_id)
    assert r.state is HoldState.REFUNDED and r.amounts == (Charge(M, 500),)
    assert (await bal(ledger, seat)).remaining == 700  # refunded: the cap is whole again
    again = await ledger.reserve(seat, [Charge(M, 700)], idempotency_key="again")
    assert again.decision is Decision.GRANTED


async def test_refund_in_the_next_period_of_overage_committed_there_is_not_billed(
        ledger: Ledger, clock: ManualClock) -> None:
    clock.set(ms(2026, 11, 30, 20))
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 500, unit_price_micros=10_000)
    org = Subject("o")
    h = await ledger.reserve(org, [Charge(M, 300)], idempotency_key="h", ttl_seconds=DAY_S)
    assert h.decision is Decision.GRANTED  # 100 monthly + 200 overage
    clock.set(ms(2026, 12, 1, 1))
    await ledger.commit(h.reservation_id)
    assert (await bal(ledger, org)).overage_used == 200  # billed in December
    await ledger.refund(h.reservation_id)
    b = await bal(ledger, org)
    assert (b.overage_used, b.used) == (0, 0)
    assert b.remaining == 100 + 500


@pytest.mark.parametrize("resolve", ["refund", "commit"])
async def test_extend_in_the_next_period_then_resolve_leaves_no_seat_hold_behind(
        ledger: Ledger, clock: ManualClock, resolve: str) -> None:
    clock.set(ms(2026, 11, 30, 20))
    await ledger.upsert_plan("small", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 700)])
    seat = Subject("o", seat_id="s")
    h = await ledger.reserve(seat, [Charge(M, 100)], idempotency_key="h", ttl_seconds=DAY_S)
    clock.set(ms(2026, 12, 1, 1))
    e = await ledger.extend(h.reservation_id, [Charge(M, 200)], DAY_S)
    assert e.decision is Decision.GRANTED
    b = await bal(ledger, seat)
    # December's buckets hold the 200 it added; the seat cap counts all 300 from now on
    assert (b.reserved, b.remaining) == (200, 400)
    if resolve == "refund":
        await ledger.refund(h.reservation_id)
        after = 700
    else:
        await ledger.commit(h.reservation_id)  # December's usage: 300
        after = 400
    b = await bal(ledger, seat)
    assert (b.reserved, b.remaining) == (0, after)


# -- allocation templates ------------------------------------------------------------------

async def test_lowering_a_spent_allocation_does_not_give_the_org_new_tokens(
        ledger: Ledger) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_team("o", "red")
    await ledger.set_allocation_template("o", M, "custom", custom={"red": 1_000})
    red = Subject("o", team_id="red")
    r = await ledger.reserve(red, [Charge(M, 1_000)], idempotency_key="r")
    await ledger.commit(r.reservation_id)
    await ledger.set_allocation_template("o", M, "custom", custom={"red": 0})
    o = await ledger.reserve(Subject("o"), [Charge(M, 1)], idempotency_key="o")
    assert o.decision is Decision.DENIED  # the month's 1,000 are spent


async def test_raising_allocations_takes_only_what_the_org_has_free(ledger: Ledger) -> None:
    """Adding a team under an even split, mid-month, after the only team spent the whole
    pool: the new team's share is not new money; it comes with the next period."""
    await ledger.upsert_plan("small", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_team("o", "red")
    await ledger.set_allocation_template("o", M, "even")
    red = Subject("o", team_id="red")
    r = await ledger.reserve(red, [Charge(M, 1_000)], idempotency_key="r")
    await ledger.commit(r.reservation_id)
    await ledger.upsert_team("o", "blue")  # even: 500 each from now on
    blue = Subject("o", team_id="blue")
    assert (await bal(ledger, blue)).remaining == 0
    assert (await ledger.reserve(blue, [Charge(M, 1)], idempotency_key="b")).decision \
        is Decision.DENIED


# -- a conservation state machine: templates, team seats, transfers, top-ups, adjust ------
# (test_stateful.py checks one org, team and seat against a model of every figure; this
# one drives what it leaves out: several teams and seats, allocation templates and team
# seats changed while holds are open, Adjust, purchase replays, refused calls.)

POOL = 1_000
WHO = {"org": Subject("c"), "red": Subject("c", "red"), "blue": Subject("c", "blue"),
       "s1": Subject("c", seat_id="s1"), "s2": Subject("c", seat_id="s2"),
       "s3": Subject("c", seat_id="s3")}
#: the wallet each subject's own tokens are in (the balance hash's field prefix)
PFX = {"org": "", "red": "T:red:", "blue": "T:blue:", "s1": "S:s1:", "s2": "S:s2:",
       "s3": "S:s3:"}
WALLETS = {"org": {}, "red": {"team_id": "red"}, "blue": {"team_id": "blue"},
           "s1": {"seat_id": "s1"}, "s3": {"seat_id": "s3"}}
CAP = {"s1": 600}


class MoneyMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.n = itertools.count()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return LOOP.run_until_complete(coro)

    @initialize()
    def setup(self) -> None:
        self.clock = ManualClock(T0)
        self.led = Ledger(MREDIS, catalog.load(None).catalog, self.clock, Keys(16),
                          LedgerOptions(default_ttl_s=60))
        self.bal = self.led.keys.bal("c", M)

        async def go() -> None:
            if CLUSTER:
                await MREDIS.flushall(target_nodes=aiocluster.RedisCluster.PRIMARIES)
            else:
                await MREDIS.flushall()
            await self.led.upsert_plan("p", [Allowance(M, POOL)])
            await self.led.upsert_org("c", "p")
            await self.led.upsert_team("c", "red", 2)
            await self.led.upsert_team("c", "blue", 1)
            await self.led.upsert_seat("c", "s1", "red", [SeatLimit(M, CAP["s1"])])
            await self.led.upsert_seat("c", "s2", "blue")
            await self.led.upsert_seat("c", "s3")
            await self.led.set_overage("c", M, 200)
        self.run(go())
        self.rids: list[str] = []
        self.purchases: dict[str, tuple[int, str]] = {}

    async def snapshot(self) -> dict[Any, Any]:
        k = self.led.keys
        return {key: await MREDIS.dump(key)
                for key in (self.bal, k.cfg("c"), k.purchases("c"))}

    @rule(target=holds, who=st.sampled_from(sorted(WHO)), amount=st.integers(1, 700),
          ttl=st.sampled_from([60, 3600]))
    def reserve(self, who: str, amount: int, ttl: int) -> str:
        r = self.run(self.led.reserve(WHO[who], [Charge(M, amount)], ttl_seconds=ttl,
                                      idempotency_key=f"k{next(self.n)}"))
        if r.decision is Decision.GRANTED:
            self.rids.append(r.reservation_id)
            return r.reservation_id
        return ""

    @rule(rid=consumes(holds), actual=st.none() | st.integers(0, 900))
    def commit(self, rid: str, actual: int | None) -> None:
        if rid:
            self.run(self.led.commit(rid, [] if actual is None else [Charge(M, actual)]))

    @rule(rid=holds, partial=st.none() | st.integers(1, 900))
    def refund(self, rid: str, partial: int | None) -> None:
        if rid:
            first = self.run(self.led.refund(rid, [] if partial is None
                                             else [Charge(M, partial)]))
            again = self.run(self.led.refund(rid))
            assert (again.state, again.amounts) == (first.state, first.amounts)

    @rule(rid=holds, add=st.integers(1, 300))
    def extend(self, rid: str, add: int) -> None:
        if rid:
            try:
                self.run(self.led.extend(rid, [Charge(M, add)], 3600))
            except FailedPrecondition:
                pass  # resolved or expired

    @rule(to=st.sampled_from(sorted(WALLETS)), amount=st.integers(1, 500),
          replay=st.booleans())
    def topup(self, to: str, amount: int, replay: bool) -> None:
        replay = replay and bool(self.purchases)
        if replay:
            pid, (amount, to) = sorted(self.purchases.items())[0]
        else:
            pid = f"p{next(self.n)}"
            self.purchases[pid] = (amount, to)
        kw = WALLETS[to]
        r = self.run(self.led.topup("c", M, amount, pid, kw.get("team_id", ""),
                                    kw.get("seat_id", "")))
        assert r.applied is not replay  # a purchase id is applied once
        # the same id for another amount is refused, and changes nothing
        before = self.run(self.snapshot())
        with pytest.raises(InvalidArgument):
            self.run(self.led.topup("c", M, amount + 1, pid, kw.get("team_id", ""),
                                    kw.get("seat_id", "")))
        assert self.run(self.snapshot()) == before

    @rule(src=st.sampled_from(sorted(WALLETS)), dst=st.sampled_from(sorted(WALLETS)),
          bucket=st.sampled_from(["monthly", "topup"]), amount=st.integers(1, 600))
    def transfer(self, src: str, dst: str, bucket: str, amount: int) -> None:
        if src == dst:
            return
        kw = {f"from_{k}": v for k, v in WALLETS[src].items()}
        kw |= {f"to_{k}": v for k, v in WALLETS[dst].items()}
        before = self.run(self.snapshot())
        try:
            self.run(self.led.transfer("c", M, amount, bucket,
                                       idempotency_key=f"x{next(self.n)}", **kw))
        except FailedPrecondition:
            assert self.run(self.snapshot()) == before  # refused: nothing changed

    @rule(delta=st.integers(-400, 400).filter(bool))
    def adjust(self, delta: int) -> None:
        self.run(self.led.adjust("c", M, delta, "fix", idempotency_key=f"a{next(self.n)}"))

    @rule(mode=st.sampled_from(["", "per_seat", "even", "custom"]),
          per_seat=st.integers(0, 400), red=st.integers(0, 700), blue=st.integers(0, 700))
    def template(self, mode: str, per_seat: int, red: int, blue: int) -> None:
        before = self.run(self.snapshot())
        try:
            self.run(self.led.set_allocation_template(
                "c", M, mode, per_seat=per_seat,
                custom={"red": red, "blue": blue} if mode == "custom" else None))
        except FailedPrecondition:
            assert self.run(self.snapshot()) == before

    @rule(team=st.sampled_from(["red", "blue"]), seats=st.integers(0, 4))
    def team_seats(self, team: str, seats: int) -> None:
        before = self.run(self.snapshot())
        try:
            self.run(self.led.upsert_team("c", team, seats))
        except FailedPrecondition:
            assert self.run(self.snapshot()) == before

    @rule(seconds=st.sampled_from([1, 61, 3600, 20 * DAY_S]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds * 1000)

    @rule()
    def sweep(self) -> None:
        self.run(self.led.sweep(self.led.keys.shard_of("c"), 100))

    def teardown(self) -> None:
        if hasattr(self, "led"):
            self.run(self.led.aclose())

    @invariant()
    def tokens_are_conserved(self) -> None:
        if not hasattr(self, "led"):
            return
        views = {w: self.run(self.led.get_balance(s, [M]))[0] for w, s in WHO.items()}
        raw = self.run(MREDIS.hgetall(self.bal))
        ws = {k.decode()[:-1]: dict(zip(wallet.FIELDS, wallet.decode(v), strict=True))
              for k, v in raw.items() if wallet.is_wallet(k.decode())}
        pid = max(w["p"] for w in ws.values())
        assert all(w["p"] == pid for w in ws.values()), ws  # every wallet was touched
        # monthly tokens are moved, never made: the wallets' grants add up to the plan
        assert sum(w["mg"] for w in ws.values()) == POOL, ws
        for name, w in ws.items():
            assert min(w["mu"], w["mh"], w["tb"], w["th"], w["tu"], w["cu"], w["ch"]) >= 0, \
                (name, w)
            # nothing used or held beyond what the wallet was granted, nor held beyond
            # the top-up it has
            assert w["mu"] + w["mh"] <= w["mg"] and w["th"] <= w["tb"], (name, w)
        o = ws[""]
        assert o["oh"] <= 200  # never held beyond the overage cap
        # what the wallets hold is exactly what the open holds took
        held: dict[str, int] = {}
        seat_held: dict[str, int] = {}
        for rid in self.rids:
            h = {k.decode(): v.decode() for k, v in
                 self.run(MREDIS.hgetall(self.led.keys.hold(rid))).items()}
            if h.get("st") != "H":
                continue
            for code, p, amt in (t.split(":") for t in h["t1"].split(",") if t):
                lvl = {"S": f"S:{h.get('se', '')}:", "T": f"T:{h.get('te', '')}:",
                       "O": ""}[code[0]]
                if code[1] == "t" or int(p) == pid:
                    key = lvl + {"m": "mh", "t": "th", "o": "oh"}[code[1]]
                    held[key] = held.get(key, 0) + int(amt)
            if h.get("se") and int(h["hp1"]) == pid:
                seat_held[h["se"]] = seat_held.get(h["se"], 0) + int(h["g1"])
        for name, w in ws.items():
            for f in ("mh", "th", "oh"):
                assert w[f] == held.get(name + f, 0), (name, f, w, held)
            if name.startswith("S:"):
                assert w["ch"] == seat_held.get(name[2:-1], 0), (name, w, seat_held)
        # debt waits only while the org wallet has nothing free
        d = views["org"].debt
        assert d >= 0
        if d:
            assert o["mg"] - o["mu"] - o["mh"] <= 0 and o["tb"] - o["th"] <= 0, (d, o)


LOOP: asyncio.AbstractEventLoop
MREDIS: Any


@pytest.mark.timeout(600)
def test_money_is_conserved(redis_server: Any) -> None:
    global LOOP, MREDIS
    LOOP = asyncio.new_event_loop()
    MREDIS = (aiocluster.RedisCluster.from_url(redis_server.seed_url) if CLUSTER
              else aioredis.Redis.from_url(redis_server.url))
    try:
        MoneyMachine.TestCase.settings = settings(
            max_examples=int(os.environ.get("QG_EXAMPLES", "60")), stateful_step_count=40,
            deadline=None, suppress_health_check=[HealthCheck.too_slow])
        MoneyMachine.TestCase().runTest()
    finally:
        LOOP.run_until_complete(MREDIS.aclose())
        LOOP.close()
