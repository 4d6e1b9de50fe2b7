"""Each runtime RPC is exactly one Redis round trip: one FCALL (a Redis Function), nothing
else.

MONITOR shows every command a client sends and tags those a Lua script issues as `lua`,
so the client-issued commands between two markers are exactly the RPC's round trips."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis as sync_redis

from conftest import CLUSTER, Grpc
from grpc_api import Api, ch, sub
from quotagate.app import App
from quotagate.settings import Settings
from quotagate.v1 import quota_pb2
from redis_server import RedisServer

pytestmark = pytest.mark.skipif(CLUSTER, reason="MONITOR watches one server")

IGNORED = {"PING", "SCRIPT", "INFO", "CLIENT"}  # health probes run on their own schedule


class Monitor:
    def __init__(self, url: str) -> None:
        self.client = sync_redis.Redis.from_url(url)
        self.lines: list[tuple[str, str]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def run(self) -> None:
        with self.client.monitor() as m:
            self.ready.set()
            for cmd in m.listen():
                words = cmd["command"].split()
                self.lines.append((cmd.get("client_type", ""), words[0].upper()))
                if words[:2] == ["ECHO", "stop-monitor"]:
                    return

    def segments(self) -> list[list[str]]:
        """Client-issued commands between each pair of ECHO markers."""
        out: list[list[str]] = []
        inside = False
        for kind, cmd in self.lines:
            if cmd == "ECHO":
                inside = not inside
                if inside:
                    out.append([])
                continue
            if inside and kind != "lua" and cmd not in IGNORED:
                out[-1].append(cmd)
        return out

    def markers(self) -> int:
        return sum(1 for _, cmd in self.lines if cmd == "ECHO")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis no other test talks to."""
    srv = RedisServer().start()
    yield srv
    srv.close()


@pytest.fixture
async def quiet_server(own_redis: RedisServer, tmp_path: Any) -> AsyncIterator[Grpc]:
    """A server without background duties (syncer, notifier, sweeper) on its own Redis,
    so that every command MONITOR sees between the markers comes from the measured RPC."""
    settings = Settings(listen="127.0.0.1:0", redis_url=own_redis.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                        sync_in_process=False, notify_in_process=False,
                        metrics_listen="127.0.0.1:0")
    app = await App(settings).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Grpc(app, channel)
    await channel.close()
    await app.stop()


async def test_reserve_commit_check_balance_are_one_fcall_each(
        quiet_server: Grpc, own_redis: RedisServer) -> None:
    redis_server = own_redis
    server = quiet_server
    api = Api(server)
    await api.plan("pro", monthly=1_000)
    await api.org()
    mon = Monitor(redis_server.url)
    marker = sync_redis.Redis.from_url(redis_server.url)

    names: list[str] = []

    async def measure(name: str, call: Any) -> Any:
        marker.echo("begin")
        result = await call
        marker.echo("end")
        names.append(name)
        while mon.markers() < 2 * len(names):  # noqa: ASYNC110 - a thread fills it
            await asyncio.sleep(0.01)
        return result

    r = await measure("Reserve", api.q.Reserve(quota_pb2.ReserveRequest(
        subject=sub(), charges=[ch(10)], idempotency_key="one")))
    await measure("Commit", api.q.Commit(quota_pb2.CommitRequest(
        reservation_id=r.reservation_id)))
    await measure("Check", api.q.Check(quota_pb2.CheckRequest(subject=sub())))
    await measure("GetBalance", api.q.GetBalance(quota_pb2.GetBalanceRequest(subject=sub())))
    marker.echo("stop-monitor")
    marker.close()
    seen = dict(zip(names, mon.segments()[:len(names)], strict=True))
    assert seen == {"Reserve": ["FCALL"], "Commit": ["FCALL"], "Check": ["FCALL"],
                    "GetBalance": ["FCALL"]}
