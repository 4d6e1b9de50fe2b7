"""Fixtures: real Redis servers started by the tests, the real gRPC server on port 0."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from quotagate.settings import GRPC_POLL_EXPERIMENTS  # does not load grpc

# The in-process servers run on the I/O `quotagate serve` ships with (QUOTAGATE_GRPC_IO=poll);
# gRPC reads this once, when it loads. test_serve runs both choices in real processes.
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_POLL_EXPERIMENTS)

import grpc
import pytest
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster

from cluster_server import RedisCluster
from quotagate import catalog
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import Allowance
from quotagate.ledger.store import Ledger
from quotagate.settings import Settings
from redis_server import RedisServer

#: 2026-11-10 00:00 UTC — tests move the clock from here.
T0 = int(dt.datetime(2026, 11, 10, tzinfo=dt.UTC).timestamp() * 1000)
DAY = 86_400_000


def ms(y: int, m: int, d: int, hh: int = 0) -> int:
    return int(dt.datetime(y, m, d, hh, tzinfo=dt.UTC).timestamp() * 1000)


#: QUOTAGATE_TEST_REDIS=cluster runs the same tests on a 3-master Redis Cluster.
CLUSTER = os.environ.get("QUOTAGATE_TEST_REDIS", "") == "cluster"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    srv = RedisCluster().start() if CLUSTER else RedisServer().start()
    yield srv
    srv.close()


@pytest.fixture
async def redis(redis_server: Any) -> AsyncIterator[Any]:
    if CLUSTER:
        r = aiocluster.RedisCluster.from_url(redis_server.seed_url)
        await r.flushall(target_nodes=aiocluster.RedisCluster.PRIMARIES)
    else:
        r = aioredis.Redis.from_url(redis_server.url)
        await r.flushall()
    yield r
    await r.aclose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def cat() -> catalog.CatalogFile:
    return catalog.load(None)


@pytest.fixture
async def ledger(redis: Any, clock: ManualClock,
                 cat: catalog.CatalogFile) -> AsyncIterator[Ledger]:
    led = Ledger(redis, cat.catalog, clock, Keys(64))
    await led.upsert_plan("pro", [Allowance("message_tokens", 2_000_000)])
    yield led
    await led.aclose()


class Grpc:
    """A real server (App) on a free port, and stubs to call it."""

    def __init__(self, app: App, channel: grpc.aio.Channel) -> None:
        from quotagate.v1 import admin_pb2_grpc, quota_pb2_grpc

        self.app = app
        self.channel = channel
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
async def server(redis_server: Any, redis: Any, clock: ManualClock,
                 tmp_path: Any) -> AsyncIterator[Grpc]:
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                        metrics_listen="127.0.0.1:0")
    app = await App(settings, clock=clock).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Grpc(app, channel)
    await channel.close()
    await stop_or_report(app)


async def stop_or_report(app: App, within_s: float = 60) -> None:
    """App.stop(); one that has not finished within `within_s` fails the test with where
    every task of the loop is waiting (a hang is otherwise only pytest-timeout's thread
    dump, which shows no coroutine)."""
    import asyncio
    import io

    stop = asyncio.ensure_future(app.stop())
    done, _ = await asyncio.wait({stop}, timeout=within_s)
    if done:
        stop.result()
        return
    out = io.StringIO()
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            print(f"--- task {t.get_name()}", file=out)
            t.print_stack(limit=12, file=out)
    pytest.fail(f"App.stop() did not finish in {within_s:.0f} s; the loop's tasks:\n"
                + out.getvalue())
