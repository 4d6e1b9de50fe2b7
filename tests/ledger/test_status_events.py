"""Assistant status events when a wallet runs dry or comes back: every assistant that
draws on the wallet is told, not only the one that made the call; an assistant an admin
enables while its wallet is dry stays reported inactive."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis as sync_redis
from test_events import events

from conftest import CLUSTER, Grpc
from grpc_api import next_msg, subscribed
from quotagate.ledger.model import Allowance, Charge, Decision, DenyReason, Subject
from quotagate.ledger.store import Ledger
from quotagate.v1 import common_pb2, quota_pb2

M = "message_tokens"
INACTIVE = common_pb2.DENY_REASON_ASSISTANT_INACTIVE






def bot(org: str, a: str) -> Subject:
    return Subject(org, assistant_id=a)


async def status(ledger: Ledger, redis: Any, org: str) -> list[tuple[str, str, str]]:
    """(type, assistant, reason) of the org's assistant events, in order."""
    return [(t[len("assistant."):], a["assistant_id"], a.get("reason", ""))
            for t, _, a in await events(ledger, redis, org) if t.startswith("assistant.")]


async def spend(ledger: Ledger, s: Subject, held: int, used: int, key: str) -> None:
    r = await ledger.reserve(s, [Charge(M, held)], idempotency_key=key)
    assert r.decision is Decision.GRANTED, r
    await ledger.commit(r.reservation_id, [Charge(M, used)])


async def draws(ledger: Ledger, org: str, a: str) -> None:
    """Assistant `a` draws on the meter (a Reserve, here handed back at once): only the
    assistants that draw on a wallet are told when it runs dry."""
    r = await ledger.reserve(bot(org, a), [Charge(M, 1)], idempotency_key=f"draw-{a}")
    assert r.decision is Decision.GRANTED, r
    await ledger.refund(r.reservation_id)


async def org_with(ledger: Ledger, org: str, monthly: int, *assistants: str) -> None:
    await ledger.upsert_plan(f"p-{org}", [Allowance(M, monthly)])
    await ledger.upsert_org(org, f"p-{org}")
    for a in assistants:
        await ledger.upsert_assistant(org, a)
        await draws(ledger, org, a)


async def test_one_assistant_overspending_deactivates_every_assistant_on_the_wallet(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "o", 100, "a", "b")
    await ledger.upsert_assistant("o", "off", enabled=False)
    await spend(ledger, bot("o", "a"), 60, 130, "k1")  # 30 beyond the wallet: debt
    assert await status(ledger, redis, "o") == [
        ("deactivated", "a", "exhausted"), ("deactivated", "b", "exhausted")]
    # b is told before it calls; its own calls agree and repeat nothing
    c = await ledger.check(bot("o", "b"))
    assert (c.active, c.reason, c.silent) == (False, DenyReason.ASSISTANT_INACTIVE, True)
    r = await ledger.reserve(bot("o", "b"), [Charge(M, 1)], idempotency_key="k2")
    assert (r.decision, r.silent) == (Decision.DENIED, True)
    assert len(await status(ledger, redis, "o")) == 2  # a disabled one is not told
    await ledger.topup("o", M, 50, "buy")  # pays the 30 of debt, 20 left
    assert (await status(ledger, redis, "o"))[2:] == [
        ("reactivated", "a", ""), ("reactivated", "b", "")]
    assert (await ledger.check(bot("o", "b"))).active


async def test_a_hold_of_the_last_tokens_tells_the_others_and_a_release_brings_them_back(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "h", 100, "a", "b")
    r = await ledger.reserve(bot("h", "a"), [Charge(M, 500)], idempotency_key="k",
                             allow_partial=True)
    assert r.granted[0].amount == 100
    assert {x for _, x, _ in await status(ledger, redis, "h")} == {"a", "b"}
    assert not (await ledger.check(bot("h", "b"))).active  # what Reserve would answer
    await ledger.commit(r.reservation_id, [Charge(M, 100)])  # nothing new: already told
    assert len(await status(ledger, redis, "h")) == 2
    r2 = await ledger.reserve(Subject("h"), [Charge(M, 1)], idempotency_key="k2")
    assert r2.decision is Decision.DENIED


async def test_a_spender_without_assistant_drains_the_wallet(ledger: Ledger,
                                                             redis: Any) -> None:
    await org_with(ledger, "s", 100, "a")
    await ledger.upsert_seat("s", "alice")
    await spend(ledger, Subject("s", seat_id="alice"), 100, 100, "k1")
    assert await status(ledger, redis, "s") == [("deactivated", "a", "exhausted")]
    r = await ledger.reserve(Subject("s", seat_id="alice"), [Charge(M, 40)],
                             idempotency_key="k2")
    assert r.decision is Decision.DENIED
    await ledger.adjust("s", M, 40, "goodwill", idempotency_key="adj")
    assert (await status(ledger, redis, "s"))[-1] == ("reactivated", "a", "")


async def test_only_the_assistants_drawing_on_a_dry_team_allocation(ledger: Ledger,
                                                                    redis: Any) -> None:
    """With a template, a team's allocation is its budget: when it runs dry its
    assistants are deactivated, the org's others keep going, and the other way round."""
    await org_with(ledger, "t", 1_000)
    for team in ("red", "blue"):
        await ledger.upsert_team("t", team)
    await ledger.set_allocation_template("t", M, "custom", custom={"red": 100, "blue": 300})
    for a, team in (("r1", "red"), ("r2", "red"), ("b1", "blue"), ("o1", "")):
        await ledger.upsert_assistant("t", a, team_id=team)
        await draws(ledger, "t", a)
    await spend(ledger, bot("t", "r1"), 100, 100, "k1")
    assert sorted(await status(ledger, redis, "t")) == [
        ("deactivated", "r1", "exhausted"), ("deactivated", "r2", "exhausted")]
    await spend(ledger, bot("t", "o1"), 600, 600, "k2")  # the org's 600 left
    assert (await status(ledger, redis, "t"))[2:] == [("deactivated", "o1", "exhausted")]
    assert (await ledger.check(bot("t", "b1"))).active
    # tokens moved to red bring its assistants back, not the org's
    await ledger.topup("t", M, 10, "buy", team_id="red")
    assert sorted((await status(ledger, redis, "t"))[3:]) == [
        ("reactivated", "r1", ""), ("reactivated", "r2", "")]


async def test_without_template_a_team_with_tokens_of_its_own_keeps_going(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "n", 1_000, "plain")
    await ledger.upsert_team("n", "rich")
    await ledger.upsert_assistant("n", "rb", team_id="rich")
    await draws(ledger, "n", "rb")
    await ledger.topup("n", M, 200, "team-buy", team_id="rich")  # the team's own
    await spend(ledger, bot("n", "plain"), 1_000, 1_000, "k1")
    assert await status(ledger, redis, "n") == [("deactivated", "plain", "exhausted")]
    assert (await ledger.check(bot("n", "rb"))).active


async def test_adjust_and_transfer_out_of_a_wallet_deactivate_and_back(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "m", 100, "a")
    await ledger.upsert_team("m", "t")
    await ledger.upsert_assistant("m", "ta", team_id="t")
    await draws(ledger, "m", "ta")
    await ledger.adjust("m", M, -100, "correction", idempotency_key="a1")
    assert sorted(await status(ledger, redis, "m")) == [
        ("deactivated", "a", "exhausted"), ("deactivated", "ta", "exhausted")]
    await ledger.adjust("m", M, 50, "back", idempotency_key="a2")
    assert len(await status(ledger, redis, "m")) == 4  # both reactivated
    # moving the org's top-up to team t: the team's assistant keeps it, the org's is dry
    await ledger.transfer("m", M, 50, "topup", idempotency_key="t1", to_team_id="t")
    evs = await status(ledger, redis, "m")
    assert evs[4:] == [("deactivated", "a", "exhausted")]
    assert (await ledger.check(bot("m", "ta"))).active
    assert not (await ledger.check(bot("m", "a"))).active


async def test_enabling_an_assistant_whose_wallet_is_dry_keeps_it_inactive(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "e", 100, "a")
    await spend(ledger, bot("e", "a"), 100, 100, "k1")
    await ledger.upsert_assistant("e", "a", enabled=False)
    await ledger.upsert_assistant("e", "a", enabled=True)
    assert await status(ledger, redis, "e") == [
        ("deactivated", "a", "exhausted"), ("deactivated", "a", "disabled"),
        ("deactivated", "a", "exhausted")]
    r = await ledger.reserve(bot("e", "a"), [Charge(M, 1)], idempotency_key="k2")
    assert (r.decision, r.reason, r.silent) == (Decision.DENIED,
                                                DenyReason.ASSISTANT_INACTIVE, True)
    await ledger.upsert_assistant("e", "a", enabled=True)  # no change: nothing said
    assert len(await status(ledger, redis, "e")) == 3
    await ledger.topup("e", M, 10, "buy")
    assert (await status(ledger, redis, "e"))[3:] == [("reactivated", "a", "")]
    # a new assistant has drawn on nothing yet: every meter the org was given is looked
    # at, and on a dry wallet it is inactive from the start
    await ledger.adjust("e", M, -10, "take back", idempotency_key="a1")
    await ledger.upsert_assistant("e", "late")
    assert (await status(ledger, redis, "e"))[-1] == ("deactivated", "late", "exhausted")
    assert not (await ledger.check(bot("e", "late"))).active


async def test_enabling_after_a_refill_while_disabled_reactivates_once(
        ledger: Ledger, redis: Any) -> None:
    await org_with(ledger, "f", 100, "a")
    await spend(ledger, bot("f", "a"), 100, 100, "k1")
    await ledger.upsert_assistant("f", "a", enabled=False)
    await ledger.topup("f", M, 10, "buy")  # disabled: it stays off, and listed
    assert len(await status(ledger, redis, "f")) == 2
    await ledger.upsert_assistant("f", "a", enabled=True)
    assert (await status(ledger, redis, "f"))[2:] == [("reactivated", "a", "enabled")]
    await spend(ledger, bot("f", "a"), 5, 5, "k2")  # no second reactivation
    assert len(await status(ledger, redis, "f")) == 3
    # moved to a team whose allocation is dry: it is deactivated there
    await ledger.upsert_team("f", "t")
    await ledger.set_allocation_template("f", M, "custom", custom={"t": 0})
    await ledger.upsert_assistant("f", "a", team_id="t")
    assert (await status(ledger, redis, "f"))[3:] == [("deactivated", "a", "exhausted")]


async def test_watch_status_of_another_assistant_on_the_wallet(server: Grpc) -> None:
    led = server.app.ledger
    assert led is not None
    await org_with(led, "w", 100, "a", "b")
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="w",
                                                                 assistant_ids=["b"]))
    assert (await next_msg(call)).active
    await subscribed(server)
    await spend(led, bot("w", "a"), 100, 100, "k1")
    m = await next_msg(call)
    assert (m.assistant_id, m.active, m.reason) == ("b", False, INACTIVE)
    await led.topup("w", M, 5, "buy")
    m = await next_msg(call)
    assert (m.assistant_id, m.active) == ("b", True)
    call.cancel()


class ScriptCommands:
    """The commands Lua scripts issue (MONITOR tags them `lua`) until stopped."""

    def __init__(self, url: str) -> None:
        self.client = sync_redis.Redis.from_url(url)
        self.seen: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def run(self) -> None:
        with self.client.monitor() as m:
            self.ready.set()
            for cmd in m.listen():
                words = cmd["command"].split()
                if words[:2] == ["ECHO", "stop-monitor"]:
                    return
                if cmd.get("client_type") == "lua":
                    self.seen.append((words[0].upper(), words[1].strip('"')))

    async def stop(self, url: str) -> list[tuple[str, str]]:
        marker = sync_redis.Redis.from_url(url)
        marker.echo("stop-monitor")
        marker.close()
        while self.thread.is_alive():  # noqa: ASYNC110 - a thread fills it
            await asyncio.sleep(0.01)
        self.client.close()
        return self.seen


@pytest.mark.skipif(CLUSTER, reason="MONITOR watches one server")
async def test_the_assistants_are_looked_up_on_the_crossing_only(
        ledger: Ledger, redis_server: Any) -> None:
    """Nothing crossing, a Reserve and a Commit by an assistant read neither the org's
    assistants nor the inactive list."""
    await org_with(ledger, "c", 100, "a", "b")
    cfg, ia = ledger.keys.cfg("c"), ledger.keys.bal("c", M) + "|ia"
    mon = ScriptCommands(redis_server.url)
    await spend(ledger, bot("c", "a"), 10, 10, "k1")
    common = await mon.stop(redis_server.url)
    assert ("XADD", ledger.keys.ledger(ledger.keys.shard_of("c"))) in common
    assert ("HGETALL", cfg) not in common and not [k for _, k in common if k == ia]
    mon = ScriptCommands(redis_server.url)
    await spend(ledger, bot("c", "a"), 90, 90, "k2")
    crossing = await mon.stop(redis_server.url)
    assert ("HGETALL", cfg) in crossing


K, CALL = "knowledge_tokens", "call_seconds"


async def test_a_meter_that_does_not_deactivate_stops_only_its_feature(
        ledger: Ledger, redis: Any) -> None:
    """knowledge_tokens (`deactivates_assistants = false` in the built-in catalog) running
    out stops uploads only: no assistant is deactivated, the uploader is told plainly
    (not silently), and chat goes on."""
    assert K in ledger.catalog.quiet_meters and M not in ledger.catalog.quiet_meters
    await ledger.upsert_plan("kp", [Allowance(M, 1_000), Allowance(K, 100)])
    await ledger.upsert_org("k", "kp")
    for a in ("up", "chat"):
        await ledger.upsert_assistant("k", a)
        await draws(ledger, "k", a)
    r = await ledger.reserve(bot("k", "up"), [Charge(K, 100)], idempotency_key="upload")
    await ledger.commit(r.reservation_id)
    r = await ledger.reserve(bot("k", "up"), [Charge(K, 10)], idempotency_key="upload-2")
    assert (r.decision, r.reason, r.silent) == (Decision.DENIED,
                                                DenyReason.INSUFFICIENT_BALANCE, False)
    c = await ledger.check(bot("k", "up"), K)
    assert (c.active, c.reason) == (False, DenyReason.INSUFFICIENT_BALANCE) and not c.silent
    assert await status(ledger, redis, "k") == []
    for a in ("up", "chat"):
        assert (await ledger.check(bot("k", a), M)).active
        r = await ledger.reserve(bot("k", a), [Charge(M, 5)], idempotency_key=f"chat-{a}")
        assert r.decision is Decision.GRANTED


async def test_only_the_assistants_drawing_on_the_meter_are_told(ledger: Ledger,
                                                                 redis: Any) -> None:
    """A voice agent uses the org's last call seconds: it is deactivated; the chatbot,
    which has never drawn on call seconds, is not (its chat is granted)."""
    await ledger.upsert_plan("vp", [Allowance(M, 1_000), Allowance(CALL, 60)])
    await ledger.upsert_org("v", "vp")
    await ledger.upsert_assistant("v", "voice")
    await ledger.upsert_assistant("v", "chat")
    await draws(ledger, "v", "chat")  # message tokens only
    r = await ledger.reserve(bot("v", "voice"), [Charge(CALL, 300)], idempotency_key="call",
                             allow_partial=True)
    assert r.granted[0].amount == 60
    await ledger.commit(r.reservation_id)
    assert await status(ledger, redis, "v") == [("deactivated", "voice", "exhausted")]
    assert (await ledger.check(bot("v", "chat"), M)).active
    r = await ledger.reserve(bot("v", "chat"), [Charge(M, 5)], idempotency_key="chat")
    assert r.decision is Decision.GRANTED
    # the voice agent is hidden for its calls, as Reserve answers
    r = await ledger.reserve(bot("v", "voice"), [Charge(CALL, 1)], idempotency_key="call-2")
    assert (r.decision, r.reason, r.silent) == (Decision.DENIED,
                                                DenyReason.ASSISTANT_INACTIVE, True)
    await ledger.topup("v", CALL, 120, "more-seconds")
    assert (await status(ledger, redis, "v"))[1:] == [("reactivated", "voice", "")]


def test_deactivates_assistants_in_the_catalog() -> None:
    from quotagate import catalog
    from quotagate.errors import ConfigError

    c = catalog.parse({"meters": {"chat": {}, "docs": {"deactivates_assistants": False},
                                  "disk": {"kind": "gauge"},
                                  "seats": {"kind": "gauge", "deactivates_assistants": True}}})
    assert c.catalog.quiet_meters == {"docs", "disk"}
    with pytest.raises(ConfigError) as e:
        catalog.parse({"meters": {"chat": {"deactivates_assistants": "no"}}}, "cat.toml")
    assert e.value.field == "cat.toml: meters.chat.deactivates_assistants"


@pytest.mark.skipif(CLUSTER, reason="MONITOR watches one server")
async def test_the_overage_index_is_written_once_a_period_not_every_call(
        ledger: Ledger, redis_server: Any) -> None:
    """The sweeper's overage index ('ovc') is written at a period's first overage (and when
    billing starts again from 0), not by every Commit that uses overage."""
    await org_with(ledger, "ov", 100)
    await ledger.set_overage("ov", M, 10_000, unit_price_micros=1_000,
                             bill_every_micros=1_000_000_000)
    ovc = ledger.keys.prefix(ledger.keys.shard_of("ov")) + "ovc"
    mon = ScriptCommands(redis_server.url)
    await spend(ledger, Subject("ov"), 100, 100, "plan")
    for i in range(5):
        await spend(ledger, Subject("ov"), 10, 10, f"over-{i}")
    seen = await mon.stop(redis_server.url)
    assert [c for c in seen if c == ("ZADD", ovc)] == [("ZADD", ovc)]


async def test_a_lower_overage_cap_or_allocation_tells_the_assistants_at_once(
        ledger: Ledger, redis: Any) -> None:
    """Admin changes that take a wallet's last room away (a lower overage cap, a smaller
    team allocation) deactivate the assistants left with nothing right away, not at
    their next call."""
    await org_with(ledger, "cap", 100, "a")
    await ledger.set_overage("cap", M, 50)
    await spend(ledger, bot("cap", "a"), 100, 100, "plan")  # the plan used; overage left
    assert await status(ledger, redis, "cap") == []
    await ledger.set_overage("cap", M, 0)
    assert await status(ledger, redis, "cap") == [("deactivated", "a", "exhausted")]
    await ledger.set_overage("cap", M, 10)
    assert (await status(ledger, redis, "cap"))[1:] == [("reactivated", "a", "")]

    await org_with(ledger, "al", 1_000)
    await ledger.upsert_team("al", "red")
    await ledger.set_allocation_template("al", M, "custom", custom={"red": 100})
    await ledger.upsert_assistant("al", "r", team_id="red")
    await draws(ledger, "al", "r")
    await spend(ledger, bot("al", "r"), 60, 60, "half")
    await ledger.set_allocation_template("al", M, "custom", custom={"red": 50})
    assert await status(ledger, redis, "al") == [("deactivated", "r", "exhausted")]


async def test_checks_and_refusals_are_not_draws(ledger: Ledger, redis: Any) -> None:
    """Only a granted Reserve marks an assistant as drawing on a meter: a chatbot that
    only asked (Check), or was refused, is not told when the call seconds run out."""
    await ledger.upsert_plan("cp", [Allowance(M, 1_000), Allowance(CALL, 60)])
    await ledger.upsert_org("cs", "cp")
    for a in ("voice", "chat", "off"):
        await ledger.upsert_assistant("cs", a)
        await draws(ledger, "cs", a)  # message tokens
    assert (await ledger.check(bot("cs", "chat"), CALL)).active  # asked, holds nothing
    await ledger.upsert_assistant("cs", "off", enabled=False)
    r = await ledger.reserve(bot("cs", "off"), [Charge(CALL, 5)], idempotency_key="off")
    assert r.decision is Decision.DENIED
    r = await ledger.reserve(bot("cs", "voice"), [Charge(CALL, 60)], idempotency_key="call")
    await ledger.commit(r.reservation_id)
    assert [e for e in await status(ledger, redis, "cs") if e[2] == "exhausted"] == [
        ("deactivated", "voice", "exhausted")]


async def test_an_org_with_many_assistants_runs_dry_in_one_step(ledger: Ledger,
                                                                redis: Any) -> None:
    """9,000 assistants: the look-up of who draws on the wallet is read in parts (Lua's
    unpack has a limit), and the Commit that empties the wallet completes, once."""
    await org_with(ledger, "big", 1_000, "a")
    cfg = ledger.keys.cfg("big")
    pipe = redis.pipeline(transaction=False)
    for i in range(9_000):
        pipe.hset(cfg, mapping={f"as:x{i}": "1", f"at:x{i}": ""})
    await pipe.execute()
    r = await ledger.reserve(bot("big", "a"), [Charge(M, 500)], idempotency_key="k")
    c = await ledger.commit(r.reservation_id, [Charge(M, 1_000)])
    assert c.state.name == "COMMITTED"
    again = await ledger.commit(r.reservation_id, [Charge(M, 1_000)])
    assert again.state.name == "COMMITTED"
    b = (await ledger.get_balance(Subject("big"), [M]))[0]
    assert b.used == 1_000
    assert ("deactivated", "a", "exhausted") in await status(ledger, redis, "big")


async def test_extending_on_a_meter_that_does_not_deactivate_is_a_plain_denial(
        ledger: Ledger, redis: Any) -> None:
    T = "transcription_seconds"
    await ledger.upsert_plan("tp", [Allowance(M, 1_000), Allowance(T, 60)])
    await ledger.upsert_org("tx", "tp")
    await ledger.upsert_assistant("tx", "v")
    r = await ledger.reserve(bot("tx", "v"), [Charge(T, 60)], idempotency_key="t")
    e = await ledger.extend(r.reservation_id, [Charge(T, 10)])
    assert (e.decision, e.reason, e.silent) == (Decision.DENIED,
                                                DenyReason.INSUFFICIENT_BALANCE, False)
    assert await status(ledger, redis, "tx") == []
