"""A delivery review of the notifier against a real Redis and real local HTTP receivers:
receivers that hang, time out or fail at random; streams lost and recreated; restarts;
dead-letter replay; signatures and ids of every request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
from events_util import KEYS, xadd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webhook_receiver import SECRET

from quotagate.events import Notifier, NotifierOptions
from quotagate.events.webhook import RetryPolicy, verify

#: (request number, raw body) -> (HTTP status, seconds to wait before answering)
Behaviour = Callable[[int, bytes], tuple[int, float]]


def header_value(v: str) -> str:
    """What the id and type headers must carry: the value itself when printable ASCII
    (every id the scripts write), else percent-encoded (http.client sends Latin-1 only,
    and no CR/LF)."""
    return "".join(c if " " <= c <= "~" else quote(c, safe="") for c in v)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many POSTs at once: no SYN dropped (a 1 s retransmit)


class Hook:
    """A local webhook receiver that records every request (raw body, headers, whether its
    signature verified) and answers as `behaviour` says."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour: Behaviour = behaviour or (lambda n, b: (204, 0.0))
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], bytes, bool]] = []
        self.accepted: list[dict[str, Any]] = []
        self.stop = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = dict(self.headers)
                ok = verify(SECRET, headers.get("X-Quotagate-Timestamp", ""), body,
                            headers.get("X-Quotagate-Signature", ""))
                with hook.lock:
                    hook.requests.append((headers, body, ok))
                    n = len(hook.requests)
                status, delay = hook.behaviour(n, body) if ok else (401, 0.0)
                if delay:
                    hook.stop.wait(delay)
                if 200 <= status < 300 and not hook.stop.is_set():
                    with hook.lock:  # processed (even if the client has given up)
                        hook.accepted.append(json.loads(body))
                with contextlib.suppress(OSError):  # the client gave up (timeout)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def __enter__(self) -> Hook:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for e in self.accepted]

    async def wait_ids(self, n: int, within: float = 10.0) -> list[str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if len(set(self.ids())) >= n:
                return self.ids()
            await asyncio.sleep(0.005)
        raise AssertionError(f"got {len(set(self.ids()))} of {n} webhooks")

    def assert_well_formed(self) -> None:
        """Every request validly signed over its exact body; the id header is the body's."""
        with self.lock:
            for headers, body, ok in self.requests:
                assert ok, headers
                ev = json.loads(body)
                assert headers["X-Quotagate-Event-Id"] == header_value(ev["id"])
                assert headers["X-Quotagate-Event-Type"] == header_value(ev["type"])


@pytest.fixture
def hook() -> Iterator[Hook]:
    with Hook() as h:
        yield h


def notifier(redis: Any, urls: list[str], retry: RetryPolicy | None = None,
             **kw: Any) -> Notifier:
    opts = dict(timeout_ms=2000, poll_ms=5, claim_idle_ms=60_000)
    opts.update(kw)
    return Notifier(redis, KEYS, NotifierOptions(
        urls=tuple(urls), secret=SECRET, retry=retry or RetryPolicy(1, 2, 3), **opts))


def org_per_shard() -> list[str]:
    """One org id for each of the 64 shards."""
    out: dict[int, str] = {}
    i = 0
    while len(out) < KEYS.shards:
        out.setdefault(KEYS.shard_of(f"org-{i}"), f"org-{i}")
        i += 1
    return [out[s] for s in sorted(out)]


async def stop(n: Notifier, task: asyncio.Task[None]) -> None:
    n.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- a hanging receiver and the others ----------------------------------------------------
async def test_a_hanging_receiver_does_not_delay_another_url(redis: Any, hook: Hook) -> None:
    """One URL accepts connections and never answers (each POST waits for its timeout);
    the other URL must still get every event at once. Before the fix every POST went
    through asyncio's default thread pool (min(32, cores + 4) threads, shared with the
    SQLite sink and the embedded Redis's revival): the hanging URL's requests, one per
    shard, filled it, and the healthy URL waited behind them."""
    orgs = org_per_shard()
    # the hanging URL's POSTs time out after 60 s, and it answers none before then: the
    # healthy URL must get everything (within 30 s) while they all still wait
    with Hook(lambda n, b: (204, 120.0)) as hang:
        n = notifier(redis, [hang.url, hook.url], timeout_ms=60_000,
                     retry=RetryPolicy(1, 2, 2))
        await n.ensure_groups()
        task = asyncio.create_task(n.run())
        try:
            await asyncio.sleep(0.05)
            ids = [await xadd(redis, "wallet.low", org, {"meter": "m"}) for org in orgs]
            await hook.wait_ids(len(ids), within=30.0)
            assert sorted(hook.ids()) == sorted(ids)
            hook.assert_well_formed()
        finally:
            hang.stop.set()
            await stop(n, task)


# -- a receiver that times out, then answers ----------------------------------------------
async def test_a_timed_out_post_is_retried_not_lost(redis: Any) -> None:
    """The first POST outlives the timeout (the receiver may or may not have processed
    it): the event is sent again with the same id and a valid fresh signature, delivered,
    not dead-lettered."""
    with Hook(lambda n, b: (204, 1.5) if n == 1 else (204, 0.0)) as slow:
        eid = await xadd(redis, "wallet.exhausted", "acme", {"meter": "m"})
        n = notifier(redis, [slow.url], timeout_ms=300, retry=RetryPolicy(1, 2, 3))
        assert await n.run_once() == 1
        assert eid in slow.ids()
        assert len(slow.requests) >= 2 and {json.loads(b)["id"] for _, b, _ in
                                            slow.requests} == {eid}
        assert await redis.xlen("qg:deadletter") == 0
        slow.assert_well_formed()


# -- the streams lost (Redis lost its data) and recreated ---------------------------------
async def test_every_url_gets_the_events_after_the_stream_was_recreated(redis: Any) -> None:
    """Redis lost its data: the events streams come back (the scripts XADD) without any
    consumer group. Each URL's lane notices NOGROUP on its own and recreates its group;
    the first to do so starts from the stream's beginning, and before the fix every later
    one took the shard for a URL "added later" and started at `$`, losing every event
    written since the stream came back."""
    with Hook() as a, Hook() as b:
        n = notifier(redis, [a.url, b.url])
        first = await xadd(redis, "wallet.low", "acme", {"meter": "m"})
        assert await n.run_once() == 1
        assert a.ids() == b.ids() == [first]

        await redis.flushall()                       # Redis lost everything
        lost = [await xadd(redis, "wallet.low", "acme", {"meter": "m", "n": str(i)})
                for i in range(3)]
        # the lanes run in loops of their own (run()): one after the other here
        for lane in n.lanes:                          # NOGROUP: each lane notices
            await n._lane_once(lane, True)
        for lane in n.lanes:                          # and recreates its group
            await n._lane_once(lane, True)
        later = await xadd(redis, "period.reset", "acme")
        await n.run_once()
        assert a.ids() == [first, *lost, later]
        assert b.ids() == [first, *lost, later]


# -- restarts: the cursor lives in Redis --------------------------------------------------
async def test_the_position_survives_restarts_nothing_lost_nothing_twice(
        redis: Any, hook: Hook) -> None:
    """Notifier processes stopped (SIGTERM: the event in hand finished) and started again
    under new consumer names, with events written while none runs: each event reaches
    the receiver once, each org's in order."""
    orgs = ["acme", "beta", "o:{x}"]
    written: dict[str, list[str]] = {o: [] for o in orgs}
    for rnd in range(4):
        for i in range(6):
            org = orgs[(i + rnd) % 3]
            written[org].append(await xadd(redis, "wallet.low", org, {"n": f"{rnd}.{i}"}))
        n = notifier(redis, [hook.url], consumer=f"p{rnd}")
        task = asyncio.create_task(n.run())
        await hook.wait_ids(sum(len(v) for v in written.values()))
        await stop(n, task)
    got = hook.ids()
    assert len(got) == len(set(got))  # nothing twice
    org_of = {i: o for o, ids in written.items() for i in ids}
    by_org = {o: [i for i in got if org_of[i] == o] for o in orgs}
    assert by_org == written
    hook.assert_well_formed()


async def test_a_notifier_cancelled_mid_post_loses_nothing(redis: Any) -> None:
    """The notifier dies while a POST is in flight (task cancelled): the event was not
    acknowledged, another notifier takes it over and delivers it (the same id)."""
    release = threading.Event()

    def slow_first(n: int, body: bytes) -> tuple[int, float]:
        if n == 1:  # the first POST is answered only once the notifier is dead
            release.wait(5)
        return 204, 0.0

    with Hook(slow_first) as h:
        eid = await xadd(redis, "assistant.deactivated", "acme", {"assistant_id": "bot"})
        dead = notifier(redis, [h.url], consumer="dead", claim_idle_ms=50)
        task = asyncio.create_task(dead.run_once())
        deadline = time.monotonic() + 5
        while not h.requests and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.sleep(0.1)
        live = notifier(redis, [h.url], consumer="live", claim_idle_ms=50)
        assert await live.run_once() == 1
        assert set(h.ids()) == {eid}
        h.assert_well_formed()


# -- dead letters ------------------------------------------------------------------------
async def test_replay_sends_the_same_bytes_and_an_interrupted_replay_loses_nothing(
        redis: Any) -> None:
    """Replayed letters carry the very body (same id, same bytes) the failed attempts
    posted, validly signed; a replay cancelled half-way and run again delivers every
    letter (at least once), and the stream ends empty."""
    down = {"on": True}
    gate = threading.Event()

    def behaviour(n: int, body: bytes) -> tuple[int, float]:
        if down["on"]:
            return 500, 0.0
        if json.loads(body)["attributes"].get("n") == "2" and not gate.is_set():
            gate.set()
            return 204, 0.3  # the replay is cancelled while this one is in flight
        return 204, 0.0

    with Hook(behaviour) as h:
        ids = [await xadd(redis, "wallet.low", o, {"meter": "m", "n": str(i)})
               for i, o in enumerate(["acme", "beta", "acme", "gamma", "acme"])]
        n = notifier(redis, [h.url], retry=RetryPolicy(1, 2, 2))
        assert await n.run_once() == 5
        assert await redis.xlen("qg:deadletter") == 5
        failed = {json.loads(b)["id"]: b for _, b, _ in h.requests}
        down["on"] = False
        replay = asyncio.create_task(n.replay_deadletter())
        await asyncio.to_thread(gate.wait, 5)  # the replay is at the third letter
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        await asyncio.sleep(0.4)
        counts = await n.replay_deadletter()
        assert counts["failed"] == 0
        assert set(h.ids()) == set(ids)
        assert await redis.xlen("qg:deadletter") == 0
        for e in h.accepted:  # byte for byte what the first attempts sent
            assert json.dumps(e, separators=(",", ":"), sort_keys=True).encode() \
                == failed[e["id"]]
        h.assert_well_formed()


# -- random failures: order and ids ------------------------------------------------------
@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fails=st.lists(st.booleans(), min_size=1, max_size=40),
       orgs=st.lists(st.sampled_from(["acme", "beta", "o:{x}", "zeta ✓"]), min_size=1,
                     max_size=12))
async def test_property_random_500s_keep_each_orgs_order_and_lose_nothing(
        redis: Any, fails: list[bool], orgs: list[str]) -> None:
    """Whatever the pattern of 500s (fewer in a row than the attempts): every event is
    accepted exactly once, each org's in the order written, every request validly signed."""
    await redis.flushall()
    pattern = list(fails)

    def behaviour(n: int, body: bytes) -> tuple[int, float]:
        return (500, 0.0) if n <= len(pattern) and pattern[n - 1] else (204, 0.0)

    with Hook(behaviour) as h:
        written = [(o, await xadd(redis, "wallet.low", o, {"i": str(i)}))
                   for i, o in enumerate(orgs)]
        n = notifier(redis, [h.url], retry=RetryPolicy(1, 1, len(pattern) + 1))
        assert await n.run_once() == len(written)
        got = h.ids()
        assert sorted(got) == sorted(i for _, i in written) and len(got) == len(set(got))
        for org in set(orgs):
            assert [i for i in got if i in {e for o, e in written if o == org}] == \
                [e for o, e in written if o == org]
        assert await redis.xlen("qg:deadletter") == 0
        h.assert_well_formed()
