"""The notifier against a real Redis and a real HTTP receiver: signed delivery of every
event type, retries, the dead-letter stream, and take-over of a dead notifier's entries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from events_util import KEYS, xadd
from redis.exceptions import ResponseError
from webhook_receiver import SECRET, Receiver

from quotagate.events import EVENT_TYPES, GROUP, Event, Notifier, NotifierOptions
from quotagate.events.webhook import RetryPolicy, sign, verify

FAST = RetryPolicy(base_ms=1, max_ms=5, attempts=4)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def notifier(redis: Any, urls: list[str], retry: RetryPolicy = FAST, **kw: Any) -> Notifier:
    return Notifier(redis, KEYS, NotifierOptions(urls=tuple(urls), secret=SECRET, retry=retry,
                                                 timeout_ms=2000, poll_ms=5, **kw))


async def pending(redis: Any, groups: list[str] | None = None) -> int:
    """Entries delivered to a notifier but not acknowledged, over every URL's group."""
    total = 0
    for g in groups or [GROUP]:
        for s in range(KEYS.shards):
            info = await redis.xpending(KEYS.events(s), g)
            total += info["pending"]
    return total


def test_signature_is_hmac_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"id":"x"}'
    want = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == "sha256=" + want
    assert verify("k", "1700000000", body, "sha256=" + want, now=1700000010)
    assert not verify("k", "1700000000", body + b" ", "sha256=" + want, now=1700000010)
    assert not verify("other", "1700000000", body, "sha256=" + want, now=1700000010)
    assert not verify("k", "1700000000", body, "sha256=" + want, now=1700009999)  # replay


async def test_every_event_type_delivered_signed(redis: Any, receiver: Receiver) -> None:
    orgs = ["acme", "o:{x} é"]  # any id, two shards
    sent = {}
    for i, t in enumerate(EVENT_TYPES):
        org = orgs[i % 2]
        attrs = {"meter": "message_tokens", "assistant_id": "bot", "n": str(i)}
        sent[await xadd(redis, t, org, attrs, at=1_762_732_800_000 + i)] = (t, org, attrs, i)
    n = notifier(redis, [receiver.url])
    assert await n.run_once() == len(EVENT_TYPES)
    got = await receiver.wait_for(len(EVENT_TYPES))
    assert receiver.bad_signatures == 0 and receiver.requests == len(EVENT_TYPES)
    assert sorted(e["type"] for e in got) == sorted(EVENT_TYPES)
    for e in got:
        t, org, attrs, i = sent[e["id"]]
        assert (e["type"], e["org_id"], e["attributes"]) == (t, org, attrs)
        assert e["at_ms"] == 1_762_732_800_000 + i and e["at"].startswith("2025-11-10T00:00:00")
    for h in receiver.headers:
        assert abs(int(h["X-Quotagate-Timestamp"]) - time.time()) < 60
        assert h["X-Quotagate-Signature"].startswith("sha256=")
        assert h["Content-Type"] == "application/json"
    assert await pending(redis, n.groups) == 0  # acknowledged after delivery
    assert await n.run_once() == 0  # nothing is delivered twice by a healthy notifier
    assert receiver.requests == len(EVENT_TYPES)
    assert await redis.xlen("qg:deadletter") == 0


async def test_every_url_gets_every_event(redis: Any) -> None:
    with Receiver() as a, Receiver() as b:
        await xadd(redis, "wallet.low", "acme", {"meter": "m"})
        await notifier(redis, [a.url, b.url]).run_once()
        assert len(await a.wait_for(1)) == len(await b.wait_for(1)) == 1
        assert a.ids() == b.ids()


async def test_failing_receiver_is_retried_then_delivered(redis: Any,
                                                          receiver: Receiver) -> None:
    receiver.fail_first = 3
    eid = await xadd(redis, "wallet.exhausted", "acme", {"meter": "message_tokens"})
    n = notifier(redis, [receiver.url])
    assert await n.run_once() == 1
    assert receiver.ids() == [eid]
    assert receiver.requests == 4  # three 500s, then 204
    assert (n.delivered, n.dead_lettered) == (1, 0)
    assert await redis.xlen("qg:deadletter") == 0
    assert await pending(redis, n.groups) == 0


async def test_retry_delays_grow_exponentially_and_are_capped() -> None:
    p = RetryPolicy(base_ms=100, max_ms=1000, attempts=8)
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (7, 1.0)]:
        for _ in range(20):
            assert full / 2 <= p.delay_s(attempt) <= full


async def test_always_failing_goes_to_dead_letter(redis: Any, receiver: Receiver) -> None:
    receiver.always_fail = True
    eid = await xadd(redis, "wallet.low", "acme", {"meter": "message_tokens"})
    dead = "http://127.0.0.1:9/nobody-listens"  # connection refused
    n = notifier(redis, [receiver.url, dead], retry=RetryPolicy(1, 2, 3))
    assert await n.run_once() == 1
    assert receiver.requests == 3  # every attempt reached the receiver
    letters = await redis.xrange("qg:deadletter")
    assert len(letters) == 2
    by_url = {f[b"url"].decode(): f for _, f in letters}
    assert by_url[receiver.url][b"error"] == b"HTTP 500"
    assert b"Error" in by_url[dead][b"error"] or b"refused" in by_url[dead][b"error"].lower()
    for f in by_url.values():
        assert f[b"id"].decode() == eid and f[b"type"] == b"wallet.low"
        assert f[b"attempts"] == b"3" and f[b"stream"].decode() == KEYS.events(
            KEYS.shard_of("acme"))
    assert await pending(redis, n.groups) == 0  # dead-lettered entries are acknowledged
    assert (n.delivered, n.dead_lettered) == (0, 2)


async def test_dead_notifier_entries_are_claimed_by_another(redis: Any,
                                                            receiver: Receiver) -> None:
    ids = [await xadd(redis, "assistant.deactivated", org, {"assistant_id": "bot"})
           for org in ("acme", "beta", "gamma")]
    stuck = asyncio.Event()

    async def hang(ev: Event) -> None:  # the first notifier dies mid-delivery
        await stuck.wait()

    first = notifier(redis, [receiver.url], consumer="first", claim_idle_ms=50)
    first.add_listener(hang)
    task = asyncio.create_task(first.run_once())
    for _ in range(500):  # until it has read all three (a slow cluster takes a while)
        await asyncio.sleep(0.01)
        try:
            if await pending(redis, first.groups) == 3:
                break
        except ResponseError:  # NOGROUP: it has not created its groups yet
            pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pending(redis, first.groups) == 3 and receiver.requests == 0

    second = notifier(redis, [receiver.url], consumer="second", claim_idle_ms=50)
    assert await second.run_once(claim=False) == 0  # not new: only claiming finds them
    await asyncio.sleep(0.06)
    assert await second.run_once() == 3
    assert sorted(receiver.ids()) == sorted(ids)
    assert await pending(redis, second.groups) == 0


async def test_listeners_see_every_event(redis: Any, receiver: Receiver) -> None:
    seen: list[Event] = []
    n = notifier(redis, [receiver.url])
    n.add_listener(seen.append)
    await xadd(redis, "period.reset", "acme")
    await xadd(redis, "wallet.replenished", "beta", {"meter": "m"})
    await n.run_once()
    assert sorted(e.type for e in seen) == ["period.reset", "wallet.replenished"]


async def test_malformed_entry_is_delivered_not_stuck(redis: Any, receiver: Receiver) -> None:
    await redis.xadd(KEYS.events(3), {"type": "wallet.low", "attrs": "{not json"})
    n = notifier(redis, [receiver.url])
    assert await n.run_once() == 1
    (got,) = await receiver.wait_for(1)
    assert got["attributes"] == {} and got["id"]  # falls back to the stream position
    assert await pending(redis, n.groups) == 0


async def test_run_loop_delivers_until_cancelled(redis: Any, receiver: Receiver) -> None:
    n = notifier(redis, [receiver.url])
    task = asyncio.create_task(n.run())
    try:
        await asyncio.sleep(0.05)
        await xadd(redis, "overage.threshold_reached", "acme", {"amount_micros": "50000000"})
        (got,) = await receiver.wait_for(1)
        assert got["type"] == "overage.threshold_reached"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_receiver_that_is_down_does_not_hold_back_the_others(redis: Any) -> None:
    """Each URL is its own lane: while one receiver fails and its retries run, the other
    gets every event at once; the failing one gets them when it is back, in order."""
    slow = RetryPolicy(base_ms=300, max_ms=300, attempts=20)  # ~3 s of retries per event
    with Receiver() as up, Receiver() as down:
        down.always_fail = True
        n = notifier(redis, [up.url, down.url], retry=slow)
        assert len(set(n.groups)) == 2
        task = asyncio.create_task(n.run())
        try:
            ids = [await xadd(redis, "wallet.low", "acme", {"meter": "message_tokens",
                                                            "n": str(i)}) for i in range(3)]
            await up.wait_for(3)
            assert up.ids() == ids
            await asyncio.sleep(0.1)
            assert down.ids() == [] and down.requests >= 1  # still retrying the first
            assert await redis.xlen("qg:deadletter") == 0
            down.always_fail = False  # back: the waiting events arrive, in stream order
            await down.wait_for(3)
            assert down.ids() == ids
            assert await pending(redis, n.groups) == 0
            assert up.ids() == ids  # nothing twice to the receiver that was up
        finally:
            n.stop()  # run() returns: both lanes stop between events
            await asyncio.wait_for(task, 5)


async def test_a_url_added_later_gets_new_events_not_the_history(redis: Any) -> None:
    with Receiver() as a, Receiver() as b:
        old = await xadd(redis, "wallet.low", "acme", {"meter": "m"})
        assert await notifier(redis, [a.url]).run_once() == 1
        new = await xadd(redis, "wallet.exhausted", "acme", {"meter": "m"})
        n = notifier(redis, [a.url, b.url])  # b configured on a running deployment
        await n.ensure_groups()                # b starts from here
        newer = await xadd(redis, "period.reset", "acme")
        assert await n.run_once() == 2
        assert a.ids() == [old, new, newer]
        assert b.ids() == [newer]
        assert await pending(redis, n.groups) == 0


async def test_dead_letters_replayed_once_the_receiver_is_back(redis: Any) -> None:
    with Receiver() as ok, Receiver() as gone:
        ok.always_fail = True
        ids = [await xadd(redis, "wallet.low", "acme", {"meter": "m", "n": str(i)})
               for i in range(3)]
        n = notifier(redis, [ok.url], retry=RetryPolicy(1, 2, 2))
        assert await n.run_once() == 3
        # a letter for a URL that is no longer configured
        await redis.xadd("qg:deadletter", {"id": "x", "type": "period.reset", "org": "acme",
                                           "url": gone.url, "error": "HTTP 500"})
        assert await redis.xlen("qg:deadletter") == 4

        # still failing: each letter is tried once (with retries) and kept, with no loop
        assert await n.replay_deadletter() == {"delivered": 0, "failed": 3, "skipped": 1}
        assert await redis.xlen("qg:deadletter") == 4

        ok.always_fail = False
        assert await n.replay_deadletter() == {"delivered": 3, "failed": 0, "skipped": 1}
        assert ok.ids() == ids  # the same event ids, oldest first
        assert ok.bad_signatures == 0
        (left,) = await redis.xrange("qg:deadletter")
        assert left[1][b"url"].decode() == gone.url and gone.requests == 0
