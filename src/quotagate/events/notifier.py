"""The notifier: every shard's events stream -> HMAC-signed webhooks, at least once.

Each shard's stream ``keys.events(shard)`` is read, for each webhook URL, with that URL's
consumer group ``quotagate-notify:<sha256(url)[:12]>``: several notifier processes share
the work, each entry goes to one of them per URL, and a receiver that is down delays only
its own deliveries. An entry is acknowledged (XACK) in a URL's group only after it was
delivered there, or after its last failed attempt was written to the dead-letter stream
``<ns>:deadletter``.
A notifier that dies leaves its entries pending; after ``claim_idle_ms`` another one takes
them over (XAUTOCLAIM) and delivers them. So an event may be delivered twice (receivers
de-duplicate on its id) but is never dropped.

The first URL's group starts at the beginning of the stream (``start_id`` "0"), so the
events written before the first notifier ran are delivered too; a URL added later starts
with the events written from then on (no replay of the history to a new receiver).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors

from quotagate.errors import ConfigError
from quotagate.events.model import Event
from quotagate.events.webhook import RetryPolicy, Sender
from quotagate.ledger.keys import Keys

log = logging.getLogger(__name__)

GROUP = "quotagate-notify"
DEADLETTER_MAXLEN = 100_000

Listener = Callable[[Event], "Awaitable[None] | None"]
Entry = tuple[str, dict[Any, Any] | None]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class NotifierOptions:
    urls: tuple[str, ...] = ()
    secret: str = field(default="", repr=False)
    timeout_ms: int = 5000
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll_ms: int = 200
    #: entries pending this long at another consumer are taken over
    claim_idle_ms: int = 60_000
    #: how often ``run`` looks for such entries
    claim_every_ms: int = 5_000
    batch: int = 100
    consumer: str = ""
    start_id: str = "0"

    @classmethod
    def from_settings(cls, s: Any) -> NotifierOptions:
        if s.webhook_urls and not s.webhook_secret:
            raise ConfigError("is required when QUOTAGATE_WEBHOOK_URLS is set (receivers "
                              "verify the signature with it)", "QUOTAGATE_WEBHOOK_SECRET")
        return cls(urls=tuple(s.webhook_urls), secret=s.webhook_secret,
                   timeout_ms=s.webhook_timeout_ms,
                   retry=RetryPolicy(s.webhook_retry_base_ms, s.webhook_retry_max_ms,
                                     s.webhook_max_attempts),
                   poll_ms=s.notify_poll_ms, claim_idle_ms=s.notify_claim_idle_ms,
                   claim_every_ms=min(s.notify_claim_idle_ms, 5_000))


def _entries(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP/XREAD reply (RESP2 list or RESP3 dict) -> [(stream, [(id, fields)])]."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3: {stream: [[entries]]}
        items = [(k, v[0] if v else []) for k, v in reply.items()]
    else:
        items = list(reply)
    return [(_s(stream), [(_s(i), f) for i, f in entries]) for stream, entries in items]


def lane_group(url: str) -> str:
    """The consumer group of one webhook URL: each URL is read at its own pace."""
    return f"{GROUP}:{hashlib.sha256(url.encode()).hexdigest()[:12]}"


@dataclass
class _Lane:
    """One delivery target's read position: a webhook URL (or, with none configured,
    the listeners alone) with its own consumer group on every shard's stream."""

    url: str | None
    group: str
    listeners: bool  # the in-process listeners run in this lane
    ready: set[int] = field(default_factory=set)
    claim_cursor: dict[int, str] = field(default_factory=dict)
    #: shards whose group vanished under this lane (NOGROUP: the stream was deleted,
    #: Redis lost its data): recreated from the stream's start, not as a URL added later
    lost: set[int] = field(default_factory=set)


class Notifier:
    """Delivers every event of every shard to the webhooks; ``run_once`` for tests,
    ``run`` as the background loop (in ``serve``, or ``quotagate notify``).

    Each URL is a lane with its own consumer group (``lane_group``): a receiver that is
    down holds back only its own deliveries while its retries run, never another URL's.
    Within a lane a shard's events go out in stream order."""

    def __init__(self, redis: Any, keys: Keys, options: NotifierOptions,
                 listeners: Iterable[Listener] = (),
                 wall: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.opt = options
        self.listeners: list[Listener] = list(listeners)
        self.consumer = options.consumer or \
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.deadletter = f"{keys.ns}:deadletter"
        self.sender = Sender(options.secret, options.retry, options.timeout_ms / 1000, wall)
        urls = list(dict.fromkeys(options.urls))
        self.lanes = [_Lane(u, lane_group(u), i == 0) for i, u in enumerate(urls)] or \
            [_Lane(None, GROUP, True)]
        self.delivered = 0
        self.dead_lettered = 0
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to return once every lane has finished the event in hand (an
        event is not cut mid-POST, so it is not delivered again after a restart)."""
        self._stopping.set()

    @property
    def groups(self) -> list[str]:
        """The consumer groups this notifier reads (one per webhook URL)."""
        return [lane.group for lane in self.lanes]

    def add_listener(self, fn: Listener) -> None:
        """In-process fan-out: ``fn`` sees every event this notifier reads (in the first
        URL's lane)."""
        self.listeners.append(fn)

    # -- groups ----------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        await self._ensure(self.lanes)

    async def _ensure(self, lanes: Sequence[_Lane]) -> None:
        """Create the lanes' groups where missing. A URL added to a running deployment
        starts with the events from now on; the webhooks of the first start begin at
        `start_id` (and so get the events written before any notifier ran)."""
        todo = sorted({s for lane in lanes for s in range(self.keys.shards)
                       if s not in lane.ready})
        if not todo:
            return
        pipe = self.redis.pipeline(transaction=False)
        for s in todo:
            pipe.xinfo_groups(self.keys.events(s))
        existing: dict[int, set[str]] = {}
        for s, r in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
            existing[s] = set() if isinstance(r, Exception) else {_s(g["name"]) for g in r}
        creates: list[tuple[_Lane, int]] = []
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            for s in todo:
                if s in lane.ready:
                    continue
                if lane.group in existing[s]:
                    lane.ready.add(s)
                    continue
                started = any(g.startswith(GROUP) for g in existing[s]) \
                    and s not in lane.lost  # another lane may have recreated its own
                pipe.xgroup_create(self.keys.events(s), lane.group,
                                   id="$" if started else self.opt.start_id, mkstream=True)
                creates.append((lane, s))
        if not creates:
            return
        for (lane, s), r in zip(creates, await pipe.execute(raise_on_error=False),
                                strict=True):
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r
            lane.ready.add(s)
            lane.lost.discard(s)

    def _lost_group(self, lane: _Lane, shard: int, err: Exception) -> None:
        if "NOGROUP" in str(err):  # the stream was deleted: recreate the group next time
            lane.ready.discard(shard)
            lane.lost.add(shard)
        else:
            log.warning("notifier: reading shard %d failed: %s", shard, err)

    # -- reading ---------------------------------------------------------------------
    async def _read_new(self, lane: _Lane) -> dict[int, list[Entry]]:
        shards = sorted(lane.ready)
        pipe = self.redis.pipeline(transaction=False)
        for s in shards:
            pipe.xreadgroup(lane.group, self.consumer, {self.keys.events(s): ">"},
                            count=self.opt.batch)
        out: dict[int, list[Entry]] = {}
        for s, r in zip(shards, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(r, Exception):
                self._lost_group(lane, s, r)
                continue
            for _, entries in _entries(r):
                if entries:
                    out.setdefault(s, []).extend(entries)
        return out

    async def _claim(self, lane: _Lane) -> dict[int, list[Entry]]:
        """Entries another (dead) consumer left pending longer than ``claim_idle_ms``."""
        shards = sorted(lane.ready)
        pipe = self.redis.pipeline(transaction=False)
        for s in shards:
            pipe.xautoclaim(self.keys.events(s), lane.group, self.consumer,
                            min_idle_time=self.opt.claim_idle_ms,
                            start_id=lane.claim_cursor.get(s, "0-0"), count=self.opt.batch)
        out: dict[int, list[Entry]] = {}
        for s, r in zip(shards, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(r, Exception):
                self._lost_group(lane, s, r)
                continue
            lane.claim_cursor[s] = _s(r[0])
            entries: list[Entry] = [(_s(i), f) for i, f in r[1]]
            entries += [(_s(i), None) for i in (r[2] if len(r) > 2 else [])]  # trimmed away
            if entries:
                out[s] = entries
        return out

    # -- delivery --------------------------------------------------------------------
    async def run_once(self, claim: bool = True) -> int:
        """Every lane: claim abandoned entries (if ``claim``), read new ones, deliver
        them all. Returns how many distinct entries were settled (delivered or
        dead-lettered) in at least one lane."""
        await self.ensure_groups()
        done = await asyncio.gather(*(self._lane_once(lane, claim) for lane in self.lanes))
        return len(set().union(*done))

    async def _lane_once(self, lane: _Lane, claim: bool) -> set[tuple[int, str]]:
        await self._ensure([lane])  # again after a NOGROUP (the stream was deleted)
        work: dict[int, list[Entry]] = await self._claim(lane) if claim else {}
        for s, entries in (await self._read_new(lane)).items():
            work.setdefault(s, []).extend(entries)
        # every shard's deliveries end before the pass does, even when one fails: a shard
        # still delivering while the next pass reads that shard again would break its order
        done = await asyncio.gather(*(self._shard(lane, s, e) for s, e in work.items()),
                                    return_exceptions=True)
        for r in done:
            if isinstance(r, BaseException):
                raise r
        return {(s, i) for s, ids in zip(work, done, strict=True)
                for i in ids}  # type: ignore[union-attr]

    async def _shard(self, lane: _Lane, shard: int, entries: Sequence[Entry]) -> list[str]:
        """One shard's entries in stream order (per-org order is kept for receivers)."""
        stream = self.keys.events(shard)
        done = []
        for entry_id, fields in entries:
            if fields is not None:
                await self.handle(lane, Event.from_fields(fields, stream, entry_id), fields)
            await self.redis.xack(stream, lane.group, entry_id)
            done.append(entry_id)
        return done

    async def handle(self, lane: _Lane, ev: Event, fields: dict[Any, Any]) -> None:
        if lane.listeners:
            for fn in self.listeners:
                try:
                    r = fn(ev)
                    if inspect.isawaitable(r):
                        await r
                except Exception:  # a broken listener must not stop webhook delivery
                    log.exception("notifier: listener failed on event %s", ev.id)
        if lane.url is None:
            return
        err = await self.sender.send(lane.url, ev.body(), ev.id, ev.type)
        if not err:
            self.delivered += 1
            return
        log.warning("notifier: event %s to %s failed %d times (%s): dead-lettered",
                    ev.id, lane.url, self.opt.retry.attempts, err)
        dl = {_s(k): _s(v) for k, v in fields.items()}
        dl.update(stream=ev.stream, entry_id=ev.entry_id, url=lane.url, error=err,
                  attempts=str(self.opt.retry.attempts),
                  failed_at=str(int(time.time() * 1000)))
        await self.redis.xadd(self.deadletter, dl, maxlen=DEADLETTER_MAXLEN,
                              approximate=True)
        self.dead_lettered += 1

    async def replay_deadletter(self, batch: int = 100) -> dict[str, int]:
        """Send each dead-lettered event again to the URL it failed at (with the usual
        retries), oldest first; a letter is deleted once delivered. Letters for a URL
        that is not configured any more are left alone. Returns counts: delivered,
        failed (left, with the new error), skipped."""
        counts = {"delivered": 0, "failed": 0, "skipped": 0}
        configured = set(self.opt.urls)
        last = await self.redis.xrevrange(self.deadletter, count=1)
        if not last:
            return counts
        end = _s(last[0][0])  # letters failing again are re-added after it: one pass
        start = "-"
        while True:
            letters = await self.redis.xrange(self.deadletter, min=start, max=end,
                                              count=batch)
            if not letters:
                return counts
            for lid, raw in letters:
                start = "(" + _s(lid)
                f = {_s(k): _s(v) for k, v in raw.items()}
                url = f.get("url", "")
                if url not in configured:
                    counts["skipped"] += 1
                    continue
                ev = Event.from_fields(f, f.get("stream", ""), f.get("entry_id", ""))
                err = await self.sender.send(url, ev.body(), ev.id, ev.type)
                if err:
                    counts["failed"] += 1
                    await self.redis.xadd(self.deadletter, {
                        **f, "error": err, "failed_at": str(int(time.time() * 1000))},
                        maxlen=DEADLETTER_MAXLEN, approximate=True)
                else:
                    counts["delivered"] += 1
                    self.delivered += 1
                await self.redis.xdel(self.deadletter, lid)

    async def run(self) -> None:
        """Deliver until ``stop()`` (or cancelled), each lane in its own loop; Redis
        trouble is logged and retried."""
        while not self._stopping.is_set():
            try:
                await self.ensure_groups()
                break
            except Exception as e:  # Redis not there yet: the lanes would fail alike
                log.warning("notifier: creating the consumer groups failed: %s", e)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
        await asyncio.gather(*(self._lane_loop(lane) for lane in self.lanes))

    async def _lane_loop(self, lane: _Lane) -> None:
        next_claim = 0.0
        me = asyncio.current_task()
        while not self._stopping.is_set():
            if me is not None and me.cancelling():  # a library swallowed our cancellation
                raise asyncio.CancelledError
            try:
                now = time.monotonic()
                claim = now >= next_claim
                if claim:
                    next_claim = now + self.opt.claim_every_ms / 1000
                n = len(await self._lane_once(lane, claim))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
                log.warning("notifier: redis unavailable: %s", e)
                n = 0
            except redis_errors.ResponseError as e:
                log.warning("notifier: %s", e)
                n = 0
            except Exception:  # a bug must not end delivery for good: log, go on
                log.exception("notifier: delivery pass failed")
                n = 0
            if not n:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.opt.poll_ms / 1000)


async def main(settings: Any, once: bool = False, replay: bool = False) -> int:
    """``quotagate notify``: the notifier as its own process (run it when
    QUOTAGATE_NOTIFY_IN_PROCESS=false, or next to several `serve` processes; any number
    of notifiers may run, the consumer group shares the work). Stops on SIGTERM/SIGINT."""
    import signal

    from quotagate.app import App
    from quotagate.ledger.keys import Keys

    if not settings.redis_url:
        raise ConfigError("is required for `quotagate notify` (the embedded Redis is "
                          "private to `serve`)", "QUOTAGATE_REDIS_URL")
    options = NotifierOptions.from_settings(settings)
    if not options.urls:
        raise ConfigError("no webhook to deliver to", "QUOTAGATE_WEBHOOK_URLS")
    redis = App(settings).redis_client(settings.redis_url)  # single server or cluster
    notifier = Notifier(redis, Keys(settings.shards), options)
    try:
        if replay:
            c = await notifier.replay_deadletter()
            log.info("dead letters: %(delivered)d delivered, %(failed)d failed again, "
                     "%(skipped)d for URLs not configured (left)", c)
            return 0 if not c["failed"] else 1
        if once:
            n = await notifier.run_once()
            log.info("notifier: %d event(s) settled", n)
            return 0
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(notifier.run(), name="notifier")
        log.info("notifier %s delivering to %d webhook(s)", notifier.consumer,
                 len(options.urls))
        await stop.wait()
        notifier.stop()
        await asyncio.wait([task], timeout=2)  # the event in hand, then cut
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return 0
    finally:
        await redis.aclose()
