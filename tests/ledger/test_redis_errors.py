"""Redis trouble that redis-py reports in unusual ways is still UNAVAILABLE, answered at
once, and changes nothing; our own bugs are not hidden by it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster

from conftest import CLUSTER
from quotagate.errors import Unavailable
from quotagate.ledger.model import Charge, Decision, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def test_an_exhausted_pool_is_unavailable_and_a_retry_holds_once(
        redis: Any, ledger: Ledger, redis_server: Any) -> None:
    """More calls in flight than the pool has connections (redis-py raises
    MaxConnectionsError, it does not wait): those calls are UNAVAILABLE with a message
    that says so, and their retries with the same key make one hold each."""
    if CLUSTER:
        small: Any = aiocluster.RedisCluster.from_url(redis_server.seed_url, max_connections=1)
    else:
        small = aioredis.Redis.from_url(redis_server.url, max_connections=1)
    led = Ledger(small, ledger.catalog, ledger.clock, ledger.keys,
                 dataclasses.replace(ledger.opt, pipeline=False))
    try:
        await ledger.upsert_org("o", "pro")
        # one call alone first: it loads the Function library (on a cluster, onto every
        # primary, which needs a free connection on each)
        await led.reserve(Subject("o"), [Charge(M, 10)], idempotency_key="first")
        keys = [f"k{i}" for i in range(20)]
        got = await asyncio.gather(
            *(led.reserve(Subject("o"), [Charge(M, 10)], idempotency_key=k) for k in keys),
            return_exceptions=True)
        failed = [k for k, r in zip(keys, got, strict=True) if isinstance(r, Exception)]
        assert failed, "20 calls on one connection: some find the pool empty"
        assert all(isinstance(r, Unavailable) and "pool exhausted" in str(r)
                   for r in got if isinstance(r, Exception))
        for k in failed:  # one at a time: each finds a connection
            r = await led.reserve(Subject("o"), [Charge(M, 10)], idempotency_key=k)
            assert r.decision is Decision.GRANTED and not r.replayed
        (b,) = await ledger.get_balance(Subject("o"), [M])
        assert b.reserved == 21 * 10  # one hold per key, none lost, none twice
    finally:
        await led.aclose()
        await small.aclose()


def _raise_in(filename: str, function: str, exc: BaseException) -> Any:
    """A coroutine that raises `exc` from a function compiled as `filename`."""
    scope: dict[str, Any] = {"exc": exc}
    code = compile(f"async def {function}():\n    raise exc\n", filename, "exec")
    exec(code, scope)
    return scope[function]()


async def test_a_connection_closed_under_a_write_is_unavailable(ledger: Ledger) -> None:
    """redis-py 8.1 lets a transport closed during a write escape as AttributeError or
    TypeError (redis/redis-py#4287): the call never reached Redis, so it is UNAVAILABLE
    (safe to retry). The same error from anywhere else is a bug and is not hidden."""
    for kind, text in ((AttributeError, "'NoneType' object has no attribute 'writelines'"),
                       (TypeError, "'NoneType' object is not callable")):
        with pytest.raises(Unavailable, match="closed while sending"):
            await ledger._call(_raise_in("/site-packages/redis/asyncio/connection.py",
                                         "_send_packed_command", kind(text)))
        with pytest.raises(kind):
            await ledger._call(_raise_in("/src/quotagate/ledger/store.py", "reserve",
                                         kind(text)))
