"""In-process fan-out of events to the gRPC streams (WatchEvents, WatchStatus).

Separate from the notifier's consumer group on purpose: the group hands each entry to
*one* notifier, while every server process must show *every* new event to its own
streams. So the hub reads with plain XREAD, from the stream's end ("$") at the moment of
the first subscription to a shard, and only the shards that have subscribers — one XREAD
for all of them every ``poll_ms``. Not blocking XREAD: the shared client's socket timeout
(QUOTAGATE_REDIS_TIMEOUT_MS) is shorter than a useful block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from redis import exceptions as redis_errors

from quotagate.errors import FailedPrecondition, InvalidArgument, Unavailable
from quotagate.events.model import Event
from quotagate.events.notifier import _entries, _s
from quotagate.ledger.keys import Keys

log = logging.getLogger(__name__)


class Overflow(Exception):
    """The subscriber did not keep up; its stream ends so the client reconnects."""


class Subscription:
    """Events of one org, from the moment of ``subscribe`` on. Iterate it; close it."""

    def __init__(self, hub: EventHub, org_id: str, shard: int, size: int,
                 start: str = "0-0") -> None:
        self.hub = hub
        self.org_id = org_id
        self.shard = shard
        #: the shard stream's position at subscription: every event after it is delivered
        self.start = start
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self.overflowed = False

    def _put(self, ev: Event) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:  # drop what is queued; the reader gets the end marker
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def get(self) -> Event:
        ev = await self.queue.get()
        if ev is None:
            raise Overflow("the event stream fell behind; reconnect")
        return ev

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            yield await self.get()

    def close(self) -> None:
        self.hub._unsubscribe(self)


class EventHub:
    def __init__(self, redis: Any, keys: Keys, poll_ms: int = 100, queue_size: int = 1000,
                 batch: int = 500) -> None:
        self.redis = redis
        self.keys = keys
        self.poll_ms = poll_ms
        self.queue_size = queue_size
        self.batch = batch
        self._subs: dict[int, set[Subscription]] = {}
        self._cursor: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, org_id: str) -> Subscription:
        shard = self.keys.shard_of(org_id)
        if shard not in self._cursor:
            try:
                last = await self.redis.xrevrange(self.keys.events(shard), count=1)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
                raise Unavailable(f"redis unreachable: {e}") from e
            self._cursor.setdefault(shard, _s(last[0][0]) if last else "0-0")
        sub = Subscription(self, org_id, shard, self.queue_size, self._cursor[shard])
        self._subs.setdefault(shard, set()).add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read(), name="event-hub")
        return sub

    @contextlib.asynccontextmanager
    async def subscription(self, org_id: str) -> AsyncIterator[Subscription]:
        sub = await self.subscribe(org_id)
        try:
            yield sub
        finally:
            sub.close()

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.shard)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.shard]
            self._cursor.pop(sub.shard, None)

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def poll(self) -> int:
        """One XREAD over the subscribed shards; returns the entries dispatched."""
        shards = [s for s in self._subs if s in self._cursor]
        if not shards:
            return 0
        # one XREAD per stream, pipelined: a multi-stream XREAD would cross slots on a cluster
        pipe = self.redis.pipeline(transaction=False)
        for s in shards:
            pipe.xread({self.keys.events(s): self._cursor[s]}, count=self.batch)
        n = 0
        for stream, entries in [x for r in await pipe.execute() for x in _entries(r)]:
            shard = _shard_of_stream(stream)
            for entry_id, fields in entries:
                if shard in self._cursor:
                    self._cursor[shard] = entry_id
                ev = Event.from_fields(fields or {}, stream, entry_id)
                for sub in list(self._subs.get(shard, ())):
                    if sub.org_id == ev.org_id:
                        sub._put(ev)
                n += 1
        return n

    async def _read(self) -> None:
        me = asyncio.current_task()
        while self._subs:
            if me is not None and me.cancelling():  # a library swallowed our cancellation
                raise asyncio.CancelledError
            try:
                n = await self.poll()
            except Exception as e:  # Redis trouble: keep the streams open, try again
                log.warning("event hub: reading events failed: %s", e)
                n = 0
            if n < self.batch:
                await asyncio.sleep(self.poll_ms / 1000)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


#: how far ahead of Redis's clock a resume cursor may be (clocks of the hosts differ)
FUTURE_SLACK_MS = 60_000


async def replay(redis: Any, keys: Keys, org_id: str, after: tuple[int, int],
                 batch: int = 500) -> AsyncIterator[Event]:
    """The org's events after stream position `after` that its shard's stream still
    holds, oldest first. FailedPrecondition when some may already have been trimmed (the
    stream keeps about the newest 100,000): the caller cannot be sure it misses none."""
    stream = keys.events(keys.shard_of(org_id))
    start = f"{after[0]}-{after[1]}"
    try:
        info = await redis.xinfo_stream(stream) if await redis.exists(stream) else {}
        if "entries-added" in info and info["entries-added"] == info["length"]:
            gap = False  # Redis 7: nothing was ever trimmed, every event is still there
        elif info.get("length"):
            # trimming drops the oldest: some may be after `after` when the oldest left is
            first = await redis.xrange(stream, count=1)
            ms, _, seq = _s(first[0][0]).partition("-") if first else ("0", "", "0")
            gap = (int(ms), int(seq)) > after
        else:  # empty: was anything written after `after` (and then trimmed)?
            ms, _, seq = _s(info.get("last-generated-id", "0-0")).partition("-")
            gap = (int(ms), int(seq)) > after
        # A cursor no event can have yet (its time ahead of Redis's clock): every live
        # event would come "before" it and be dropped as already sent.
        t = await redis.time()
        secs, micros = next(iter(t.values())) if isinstance(t, dict) else t  # (a cluster's)
        ahead = after[0] > int(secs) * 1000 + int(micros) // 1000 + FUTURE_SLACK_MS
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
        raise Unavailable(f"redis unreachable: {e}") from e
    if ahead:
        raise InvalidArgument("is later than any event can be yet (its time is ahead of "
                              "Redis's clock): pass a cursor an event carried", "after")
    if gap:
        raise FailedPrecondition(f"events after {start} may no longer all be in Redis (the "
                                 "stream keeps the newest ~100,000 of a shard): watch from "
                                 "now on, and read what happened from ListUsage and the "
                                 "webhooks", "after")
    while True:
        try:
            entries = await redis.xrange(stream, min="(" + start, count=batch)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise Unavailable(f"redis unreachable: {e}") from e
        for entry_id, fields in entries:
            start = _s(entry_id)
            ev = Event.from_fields(fields or {}, stream, start)
            if ev.org_id == org_id:
                yield ev
        if len(entries) < batch:
            return


def _shard_of_stream(stream: str) -> int:
    """``<ns>:{<shard>}:events`` -> shard."""
    return int(stream[stream.index("{") + 1:stream.index("}")])


_HUBS: weakref.WeakKeyDictionary[Any, EventHub] = weakref.WeakKeyDictionary()


def hub_for(redis: Any, keys: Keys) -> EventHub:
    """The one hub of a Redis client (the servicers share it without being told)."""
    hub = _HUBS.get(redis)
    if hub is None:
        hub = _HUBS[redis] = EventHub(redis, keys)
    return hub
