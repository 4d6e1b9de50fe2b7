"""Events are written by the scripts atomically with the change, once per crossing."""

from __future__ import annotations

import json
from typing import Any

from conftest import ms
from quotagate.clock import ManualClock
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import entry_fields

M = "message_tokens"


async def events(ledger: Ledger, redis: Any, org: str) -> list[tuple[str, str, dict[str, str]]]:
    raw = await redis.xrange(ledger.keys.events(ledger.keys.shard_of(org)))
    out = []
    for _, f in raw:
        if f[b"org"].decode() == org:
            out.append((f[b"type"].decode(), f[b"id"].decode(), json.loads(f[b"attrs"])))
    return out


def types(evs: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    return [t for t, _, _ in evs]


async def use(ledger: Ledger, s: Subject, amount: int, key: str) -> Any:
    r = await ledger.reserve(s, [Charge(M, amount)], idempotency_key=key)
    assert r.decision is Decision.GRANTED, r
    return await ledger.commit(r.reservation_id)


async def test_low_exhausted_replenished_reset_once_per_crossing(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 1_000)])
    await ledger.upsert_org("ev", "k")
    s = Subject("ev")
    await use(ledger, s, 790, "a")
    assert "wallet.low" not in types(await events(ledger, redis, "ev"))
    await use(ledger, s, 10, "b")  # 800 of 1,000 used: the 80 % threshold
    await use(ledger, s, 50, "c")
    evs = await events(ledger, redis, "ev")
    low = [e for e in evs if e[0] == "wallet.low"]
    assert len(low) == 1 and low[0][2] == {"meter": M, "threshold_percent": "80",
                                           "used": "800", "total": "1000"}
    await use(ledger, s, 150, "d")  # dry
    for i in range(3):  # denials do not repeat the event
        r = await ledger.reserve(s, [Charge(M, 1)], idempotency_key=f"x{i}")
        assert r.decision is Decision.DENIED
    assert types(await events(ledger, redis, "ev")).count("wallet.exhausted") == 1
    await ledger.topup("ev", M, 100, "p1")
    await ledger.topup("ev", M, 100, "p1")  # a repeat purchase changes nothing
    assert types(await events(ledger, redis, "ev")).count("wallet.replenished") == 1
    clock.set(ms(2026, 12, 1))
    await ledger.get_balance(s, [M])
    await ledger.get_balance(s, [M])
    await use(ledger, s, 900, "e")  # 900 of 1,100 (top-up included) crosses 80 % again
    evs = await events(ledger, redis, "ev")
    assert types(evs).count("period.reset") == 1
    lows = [e for e in evs if e[0] == "wallet.low"]
    assert len(lows) == 2 and lows[0][1] != lows[1][1]
    assert len({i for _, i, _ in evs}) == len(evs)  # every id is distinct


async def test_assistant_deactivated_and_reactivated_once(ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 100)])
    await ledger.upsert_org("shop", "k")
    await ledger.upsert_assistant("shop", "bot:1")
    bot = Subject("shop", assistant_id="bot:1")
    await use(ledger, bot, 100, "a")  # the Commit that empties the wallet deactivates it
    evs = await events(ledger, redis, "shop")
    assert [(t, a) for t, _, a in evs if t.startswith("assistant.")] == [
        ("assistant.deactivated", {"assistant_id": "bot:1", "meter": M, "reason": "exhausted"})]
    for i in range(3):
        assert (await ledger.check(bot)).silent
        r = await ledger.reserve(bot, [Charge(M, 1)], idempotency_key=f"d{i}")
        assert r.silent
    assert types(await events(ledger, redis, "shop")).count("assistant.deactivated") == 1
    await ledger.topup("shop", M, 5, "p")
    evs = await events(ledger, redis, "shop")
    assert types(evs).count("assistant.reactivated") == 1
    assert (await ledger.check(bot)).active
    # An admin switching it off and on is reported too.
    await ledger.upsert_assistant("shop", "bot:1", enabled=False)
    await ledger.upsert_assistant("shop", "bot:1", enabled=False)
    await ledger.upsert_assistant("shop", "bot:1", enabled=True)
    evs = [(t, a.get("reason")) for t, _, a in await events(ledger, redis, "shop")
           if t.startswith("assistant.")]
    assert evs[-2:] == [("assistant.deactivated", "disabled"),
                        ("assistant.reactivated", "enabled")]


async def test_refund_brings_an_assistant_back(ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 100)])
    await ledger.upsert_org("o", "k")
    await ledger.upsert_assistant("o", "bot")
    bot = Subject("o", assistant_id="bot")
    r = await ledger.reserve(bot, [Charge(M, 100)], idempotency_key="a")
    c = await ledger.commit(r.reservation_id)
    assert c.balances[0].remaining == 0
    await ledger.refund(r.reservation_id, [Charge(M, 40)])
    assert types(await events(ledger, redis, "o"))[-1] == "assistant.reactivated"
    assert (await ledger.reserve(bot, [Charge(M, 40)], idempotency_key="b")).decision \
        is Decision.GRANTED


async def test_low_thresholds_are_configurable(redis: Any, clock: ManualClock) -> None:
    from quotagate import catalog
    from quotagate.ledger.keys import Keys
    from quotagate.ledger.store import LedgerOptions

    ledger = Ledger(redis, catalog.load(None).catalog, clock, Keys(8),
                    LedgerOptions(low_thresholds=(50, 90)))
    await ledger.upsert_plan("k", [Allowance(M, 100)])
    await ledger.upsert_org("t", "k")
    s = Subject("t")
    await use(ledger, s, 60, "a")
    await use(ledger, s, 35, "b")
    lows = [a["threshold_percent"] for t, _, a in await events(ledger, redis, "t")
            if t == "wallet.low"]
    assert lows == ["50", "90"]
    await ledger.aclose()


async def test_period_reset_is_a_ledger_entry(ledger: Ledger, redis: Any,
                                              clock: ManualClock) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 1_000)])
    await ledger.upsert_org("p", "k")
    await use(ledger, Subject("p"), 10, "a")
    clock.set(ms(2026, 12, 1))
    await ledger.get_balance(Subject("p"), [M])
    await ledger.get_balance(Subject("p"), [M])
    raw = await redis.xrange(ledger.keys.ledger(ledger.keys.shard_of("p")))
    resets = [f for f in map(entry_fields, (f for _, f in raw)) if f["type"] == "period_reset"]
    assert len(resets) == 1 and resets[0]["amount"] == "1000"


async def test_inactive_assistants_are_counted_and_an_uncounted_list_still_works(
        ledger: Ledger, redis: Any) -> None:
    """The balance hash counts the deactivated assistants (`iac`), so refills skip the
    lookup when there are none; a list without a count (an earlier build, a restore)
    is still found and its assistants still come back."""
    await ledger.upsert_plan("k", [Allowance(M, 100)])
    await ledger.upsert_org("c", "k")
    await ledger.upsert_assistant("c", "bot")
    bal = ledger.keys.bal("c", M)
    bot = Subject("c", assistant_id="bot")
    await use(ledger, bot, 100, "a")
    assert await redis.hget(bal, "iac") == b"1"
    await ledger.topup("c", M, 10, "p1")
    assert await redis.hget(bal, "iac") == b"0" and (await ledger.check(bot)).active
    await use(ledger, bot, 10, "b")  # dry again: deactivated
    assert not (await ledger.check(bot)).active
    await redis.hdel(bal, "iac")  # as an earlier build left it
    await ledger.topup("c", M, 10, "p2")
    assert (await ledger.check(bot)).active
    assert types(await events(ledger, redis, "c")).count("assistant.reactivated") == 2
    assert await redis.hget(bal, "iac") == b"0"
