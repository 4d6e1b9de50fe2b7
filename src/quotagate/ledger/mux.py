"""One pipelined Redis connection for the spend path.

redis-py checks a connection out of its pool for every command, packs the command in
Python and writes it alone: about 70 µs of CPU per EVALSHA on the machine the benchmark
runs on, more than the gRPC handler's own work. The spend path instead shares one
connection per worker process:

- every command a coroutine issues is appended to a buffer, and the buffer is written
  once per event-loop iteration, so the Reserves and Commits of concurrent requests leave
  in one write (coalesced, pipelined) and Redis reads them in one read;
- replies come back in order (RESP guarantees it) and are parsed by hiredis straight into
  the futures waiting for them, first in, first out;
- a reply that does not arrive within `timeout` seconds kills the connection: every
  command in flight on it fails with TimeoutError (the caller answers UNAVAILABLE) and the
  next command opens a new connection. A lost connection fails them with ConnectionError.

Each command is still exactly one script run; batching changes how bytes travel, never
what a script sees. Error replies become redis-py's exception classes (NoScriptError,
BusyLoadingError, ResponseError, …) so scripts.py handles both clients alike (it loads
a missing script or Function library once and retries).
On Redis Cluster, ClusterMux keeps one such connection per primary and sends each call
to the primary of its keys' slot. `rediss://` (TLS) works either way, with the TLS
settings redis-py makes of the same URL.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser


def tls_context(kwargs: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py itself would use for a connection made with `kwargs` (a
    pool's or a cluster's connection keywords, `rediss://` options included)."""
    from redis.asyncio.connection import SSLConnection

    tls = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
    return SSLConnection(**tls).ssl_context.get()


def _pack_bytes(args: tuple[Any, ...] | list[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            b = a.encode()
        elif isinstance(a, bytes):
            b = a
        elif isinstance(a, int):
            b = b"%d" % a
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def pack_py(args: tuple[Any, ...] | list[Any]) -> bytes:
    """RESP array of bulk strings (str, bytes, int). The usual command is all ASCII text
    (escaped ids, numbers, JSON): it is built as one str and encoded once."""
    parts = []
    for a in args:
        t = type(a)
        if t is int:
            a = str(a)
        elif t is not str or not a.isascii():
            return _pack_bytes(args)
        parts.append(f"${len(a)}\r\n{a}\r\n")
    return (f"*{len(args)}\r\n" + "".join(parts)).encode()


#: hiredis packs the same bytes in C, in half the time (hiredis 2.1 and later); the
#: Python version is the fallback and the reference the tests compare it with.
pack: Callable[[tuple[Any, ...] | list[Any]], bytes] = \
    getattr(hiredis, "pack_command", None) or pack_py


class _Conn(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.buf: list[bytes] = []
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            if not waiting:  # nothing asked for this: the stream is out of step
                self.fail(redis_errors.ConnectionError("unexpected reply from redis"))
                return
            fut, _ = waiting.popleft()
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis_errors.ConnectionError(f"connection to redis lost: {exc or 'closed'}"))

    # -- commands -----------------------------------------------------------------------
    def send(self, packed: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.closed:
            fut.set_exception(redis_errors.ConnectionError("connection to redis closed"))
            return fut
        self.waiting.append((fut, time.monotonic()))
        self.buf.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._check)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.buf and not self.closed and self.transport is not None:
            data = b"".join(self.buf) if len(self.buf) > 1 else self.buf[0]
            self.buf.clear()
            self.transport.write(data)

    def _check(self) -> None:
        """The oldest command in flight must have its reply within `timeout`."""
        self.timer = None
        if not self.waiting:
            return
        age = time.monotonic() - self.waiting[0][1]
        if age >= self.timeout:
            self.fail(redis_errors.TimeoutError(
                f"redis did not answer within {self.timeout * 1000:.0f} ms"))
            return
        self.timer = self.loop.call_later(self.timeout - age, self._check)

    def fail(self, exc: Exception) -> None:
        """Close the connection; every command in flight fails with `exc`."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buf.clear()
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)


class Mux:
    """The spend path's connection to a single Redis (see the module docstring).

    `kwargs` are redis-py's connection keywords (host/port or path, username, password,
    db); `timeout` bounds both connecting and each reply; `tls`: a TLS context for a
    `rediss://` server."""

    def __init__(self, kwargs: dict[str, Any], timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.kwargs = kwargs
        self.timeout = timeout
        self.tls = tls
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[_Conn] | None = None

    @classmethod
    def for_client(cls, client: Any, timeout: float | None = None) -> Mux | None:
        """A Mux to the same server as redis-py client `client`, with its socket timeout
        (else `timeout`, else 5 s) and, for `rediss://`, its TLS settings; None where it
        cannot follow it (a connection class it does not know)."""
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

        kw = pool.connection_kwargs
        if pool.connection_class is SSLConnection:
            tls: ssl.SSLContext | None = tls_context(kw)
        elif pool.connection_class in (Connection, UnixDomainSocketConnection):
            tls = None
        else:
            return None
        keep = {k: kw[k] for k in ("host", "port", "path", "username", "password", "db")
                if kw.get(k) not in (None, "")}
        return cls(keep, float(kw.get("socket_timeout") or timeout or 5.0), tls)

    async def _open(self) -> _Conn:
        loop = asyncio.get_running_loop()
        kw = self.kwargs
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if "path" in kw:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Conn(self.timeout), kw["path"])
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self.timeout), kw.get("host", "localhost"),
                        int(kw.get("port", 6379)), ssl=self.tls)
                if kw.get("password"):
                    await conn.send(pack(("AUTH", kw["username"], kw["password"])
                                         if kw.get("username") else ("AUTH", kw["password"])))
                if kw.get("db"):
                    await conn.send(pack(("SELECT", kw["db"])))
        except BaseException as e:
            if conn is not None:
                conn.fail(redis_errors.ConnectionError("connection setup failed"))
            if isinstance(e, TimeoutError):
                raise redis_errors.TimeoutError("timed out connecting to redis") from None
            if isinstance(e, OSError):  # ssl.SSLError (a certificate refused) is one too
                raise redis_errors.ConnectionError(f"cannot connect to redis: {e}") from e
            raise
        return conn

    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        task = self._connecting
        try:
            conn = await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None
        self._conn = conn
        return conn

    async def execute(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        return await conn.send(pack(args))

    async def execute_after(self, first: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        """`first`, then the command `args`, adjacent on the same connection (ASKING must
        come right before the command it allows); returns the command's reply."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connection()
        both: tuple[Any, ...] = await asyncio.gather(
            conn.send(pack(first)), conn.send(pack(args)), return_exceptions=True)
        for r in both:
            if isinstance(r, BaseException):
                raise r
        return both[1]

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._conn is not None:
            self._conn.fail(redis_errors.ConnectionError("closed"))
            self._conn = None


class ClusterMux:
    """The spend path's connections to a Redis Cluster: one pipelined Mux per primary,
    each call sent to the primary that owns its first key's slot, read from the cluster
    client's slot map (a script's keys share one slot: the shard's hash tag).

    Redirections follow the cluster protocol. MOVED (the slot has a new owner: a finished
    migration or a failover) updates the client's slot map and the call goes to the new
    owner; ASK (the slot is being migrated and the keys have left) sends ASKING and the
    call to the named node, back to back on its connection; TRYAGAIN (a multi-key call
    while some of its keys are mid-migration) waits 50 ms and tries again. At most 3
    tries in all. A connection that fails (a primary gone) fails its calls as a single
    Redis's does, and the client then finds the cluster again, once for all callers, so
    the calls that follow go to whoever owns the slots now."""

    TRIES = 3

    def __init__(self, client: Any, kwargs: dict[str, Any], timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.client = client
        self.kwargs = kwargs
        self.timeout = timeout
        self.tls = tls
        self._muxes: dict[tuple[str, int], Mux] = {}
        self._refresh: asyncio.Task[None] | None = None
        #: redirections followed, by kind (telemetry reports them)
        self.redirects = {"moved": 0, "ask": 0, "tryagain": 0}

    @classmethod
    def for_client(cls, client: Any, timeout: float | None = None) -> ClusterMux | None:
        """A ClusterMux beside redis-py cluster client `client`, with its credentials,
        socket timeout and TLS settings; None where it cannot follow it (a connection
        class it does not know)."""
        from redis.asyncio.connection import Connection, SSLConnection

        nm = getattr(client, "nodes_manager", None)
        if nm is None:
            return None
        kw = nm.connection_kwargs
        cls_ = kw.get("connection_class", Connection)
        if cls_ is SSLConnection:
            tls: ssl.SSLContext | None = tls_context(kw)
        elif cls_ is Connection:
            tls = None
        else:
            return None
        keep = {k: kw[k] for k in ("username", "password") if kw.get(k) not in (None, "")}
        return cls(client, keep, float(kw.get("socket_timeout") or timeout or 5.0), tls)

    def _mux(self, host: str, port: int) -> Mux:
        m = self._muxes.get((host, port))
        if m is None:
            m = self._muxes[(host, port)] = Mux({**self.kwargs, "host": host, "port": port},
                                                self.timeout, self.tls)
        return m

    def _owner(self, key: Any) -> tuple[str, int]:
        from redis.crc import key_slot

        k = key if isinstance(key, bytes) else str(key).encode()
        try:
            node = self.client.nodes_manager.get_node_from_slot(key_slot(k))
        except (redis_errors.SlotNotCoveredError, KeyError) as e:
            # no primary for the slot right now, or no slot map yet
            self._find_cluster()
            raise redis_errors.ClusterDownError(f"no primary known for the key: {e}") from e
        return node.host, int(node.port)

    def _find_cluster(self) -> None:
        """Re-read the cluster's layout in the background, once for every caller that
        saw a failure at the same time."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._reinitialize())

    async def _reinitialize(self) -> None:
        try:
            await self.client.nodes_manager.initialize()
        except Exception:  # the next failure tries again
            return
        live = {(n.host, int(n.port)) for n in self.client.nodes_manager.nodes_cache.values()}
        for addr in [a for a in self._muxes if a not in live]:
            await self._muxes.pop(addr).aclose()

    async def execute(self, *args: Any) -> Any:
        """Run a script call, `args` = FCALL|EVALSHA, name, number of keys, keys…, argv…
        (at least one key)."""
        host, port = self._owner(args[3])
        asking = False
        err: Exception | None = None
        for _ in range(self.TRIES):
            mux = self._mux(host, port)
            try:
                if asking:
                    return await mux.execute_after(("ASKING",), args)
                return await mux.execute(*args)
            except redis_errors.MovedError as e:
                self.redirects["moved"] += 1
                await self.client.nodes_manager.move_slot(e)
                host, port, asking = e.host, int(e.port), False
                err = e
            except redis_errors.AskError as e:
                self.redirects["ask"] += 1
                host, port, asking = e.host, int(e.port), True
                err = e
            except redis_errors.TryAgainError as e:
                self.redirects["tryagain"] += 1
                await asyncio.sleep(0.05)
                err = e
            except (redis_errors.ConnectionError, redis_errors.TimeoutError,
                    redis_errors.ClusterDownError):
                self._find_cluster()
                raise
        assert err is not None
        raise err

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for m in self._muxes.values():
            await m.aclose()
        self._muxes.clear()
