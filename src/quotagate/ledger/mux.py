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
Single servers only: on Redis Cluster the spend path stays on redis-py's cluster client.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser


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
    db); `timeout` bounds both connecting and each reply."""

    def __init__(self, kwargs: dict[str, Any], timeout: float) -> None:
        self.kwargs = kwargs
        self.timeout = timeout
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task[_Conn] | None = None

    @classmethod
    def for_client(cls, client: Any, timeout: float | None = None) -> Mux | None:
        """A Mux to the same server as redis-py client `client`, with its socket timeout
        (else `timeout`, else 5 s); None where it cannot follow it (TLS, or a connection
        class it does not know)."""
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        from redis.asyncio.connection import Connection, UnixDomainSocketConnection

        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None
        kw = pool.connection_kwargs
        keep = {k: kw[k] for k in ("host", "port", "path", "username", "password", "db")
                if kw.get(k) not in (None, "")}
        return cls(keep, float(kw.get("socket_timeout") or timeout or 5.0))

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
                        int(kw.get("port", 6379)))
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
            if isinstance(e, OSError):
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

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._conn is not None:
            self._conn.fail(redis_errors.ConnectionError("closed"))
            self._conn = None
