"""A random workload on the real Lua scripts, and helpers to compare Redis with SQL."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from quotagate.errors import QuotagateError
from quotagate.ledger.model import Allowance, Charge, Decision, SeatLimit, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import Sink, UsageQuery

METERS = ("message_tokens", "call_seconds", "knowledge_tokens")
ORGS = ("acme", "b:{or}g", "zeta ✓")  # ids with characters that need escaping
TEAMS = ("t1", "t:2")
SEATS = {"s1": "t1", "s 2": "t1", "s3": "t:2", "s4": ""}
ASSISTANTS = {"a1": "t1", "a{2}": ""}


async def setup_orgs(ledger: Ledger) -> None:
    await ledger.upsert_plan("mix", [Allowance(m, 12_000) for m in METERS])
    for org in ORGS:
        await ledger.upsert_org(org, "mix", seats=4)
        for t in TEAMS:
            await ledger.upsert_team(org, t, 2)
        for s, t in SEATS.items():
            limits = [SeatLimit("message_tokens", 15_000)] if s == "s1" else []
            await ledger.upsert_seat(org, s, t, limits)
        for a, t in ASSISTANTS.items():
            await ledger.upsert_assistant(org, a, t)


def subjects(org: str) -> list[Subject]:
    out = [Subject(org)]
    out += [Subject(org, t) for t in TEAMS]
    out += [Subject(org, t, s) for s, t in SEATS.items()]
    out += [Subject(org, t, "", a) for a, t in ASSISTANTS.items()]
    return out


@dataclass
class Workload:
    ledger: Ledger
    seed: int = 7
    open: list[str] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    ops: int = 0
    n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    async def run(self, count: int, *, clock: Any = None, transfers: bool = False) -> None:
        rng, led = self.rng, self.ledger
        for _ in range(count):
            self.n += 1
            r = rng.random()
            try:
                if r < 0.45 or not (self.open or self.committed):
                    org = rng.choice(ORGS)
                    subj = rng.choice(subjects(org))
                    meters = rng.sample(METERS, rng.choice((1, 1, 1, 2)))
                    res = await led.reserve(subj, [Charge(m, rng.randint(1, 800))
                                                   for m in meters],
                                            idempotency_key=f"k{self.n}",
                                            ttl_seconds=rng.choice((60, 300)),
                                            feature=rng.choice(("", "chat", "voice")),
                                            labels={"n": str(self.n)})
                    if res.decision == Decision.GRANTED:
                        self.open.append(res.reservation_id)
                elif r < 0.70 and self.open:
                    rid = self.open.pop(rng.randrange(len(self.open)))
                    mode = rng.random()
                    if mode < 0.4:
                        await led.commit(rid)
                    else:  # less or more than held; more may end in debt
                        try:
                            await led.commit(rid, [Charge(m, rng.randint(0, 1200))
                                                   for m in rng.sample(METERS, 2)])
                        except QuotagateError:  # a meter the hold does not have
                            await led.commit(rid)
                    self.committed.append(rid)
                elif r < 0.80 and self.open:
                    await led.refund(self.open.pop(rng.randrange(len(self.open))))
                elif r < 0.90 and self.committed:
                    rid = rng.choice(self.committed)
                    if rng.random() < 0.5:
                        await led.refund(rid, reason="partial")
                    else:
                        await led.refund(rid, [Charge(rng.choice(METERS), rng.randint(1, 300))],
                                         reason="partial")
                elif r < 0.93:
                    org = rng.choice(ORGS)
                    pid = f"p{rng.randint(1, self.n)}"  # repeats are idempotent
                    await led.topup(org, rng.choice(METERS), rng.randint(500, 4_000), pid)
                elif transfers and r < 0.96:
                    org = rng.choice(ORGS)
                    await led.transfer(org, rng.choice(METERS), rng.randint(1, 500),
                                       rng.choice(("monthly", "topup")),
                                       idempotency_key=f"x{self.n}",
                                       to_team_id=rng.choice(TEAMS))
                elif clock is not None:
                    clock.advance(rng.randint(5_000, 30_000))
                    await led.sweep_all()
                self.ops += 1
            except QuotagateError:
                self.ops += 1  # e.g. a refund of more than was charged: answered, no change

    async def settle(self) -> None:
        """Give back every open hold, so that nothing is reserved."""
        for rid in self.open:
            await self.ledger.refund(rid)
        self.open.clear()


async def stream_backlog(redis: Any, ledger: Ledger) -> int:
    """Entries waiting in the ledger streams (the syncer deletes what it acknowledged)."""
    pipe = redis.pipeline(transaction=False)
    for s in range(ledger.keys.shards):
        pipe.xlen(ledger.keys.ledger(s))
    return sum(await pipe.execute())


async def sql_usage(sink: Sink, org: str, meter: str) -> int:
    rows = await sink.usage(UsageQuery(org, meter, limit=10))
    return sum(r.amount for r in rows)


async def assert_sql_matches_redis(ledger: Ledger, sink: Sink) -> None:
    """With no hold open and one billing period, every org's usage in SQL (Σ commit −
    Σ refund) equals its org-level `used` (monthly used + top-up used + overage + debt)."""
    for org in ORGS:
        for b in await ledger.get_balance(Subject(org), METERS):
            assert b.reserved == 0, (org, b)
            assert await sql_usage(sink, org, b.meter) == b.used, (org, b)
