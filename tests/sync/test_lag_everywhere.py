"""The sync lag is reported by every process, whichever one runs the syncer: a `serve`
without an in-process syncer reads it from Redis (the Sync health service and the lag
gauges), and `quotagate sync` on its own serves the lag gauges on its /metrics."""

from __future__ import annotations

import asyncio
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotagate.app import App
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.settings import Settings
from quotagate.sync.sink import open_sink
from quotagate.sync.syncer import Syncer, SyncOptions

M = "message_tokens"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gauge(text: str, name: str) -> float:
    """The sum over shards of a gauge in a Prometheus text page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


async def _metrics(port: int) -> str:
    return await asyncio.to_thread(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


async def test_serve_without_a_syncer_reports_the_lag_from_redis(
        redis_server: Any, redis: Any, tmp_path: Path) -> None:  # `redis`: flushed first
    """`serve` with QUOTAGATE_SYNC_IN_PROCESS=false (the syncer is `quotagate sync`
    elsewhere): the Sync health service answers from the start, turns NOT_SERVING while
    entries wait in Redis longer than the alert threshold, SERVING again once another
    process copied them to SQL; /metrics has the lag gauges."""
    app = await App(Settings(
        listen="127.0.0.1:0", redis_url=redis_server.url, data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'q.db'}", sync_in_process=False,
        sync_lag_alert_seconds=0, metrics_listen="127.0.0.1:0", grace_seconds=0,
        notify_in_process=False)).start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = health_pb2_grpc.HealthStub(ch)

    async def sync_status() -> int:
        assert app.health is not None
        await app.health.update()
        r = await stub.Check(health_pb2.HealthCheckRequest(service="quotagate.v1.Sync"))
        return int(r.status)

    try:
        assert app.syncer is None and app.lag_monitor is not None and app.ledger is not None
        assert app.metrics is not None
        assert await sync_status() == health_pb2.HealthCheckResponse.SERVING
        await app.ledger.upsert_plan("p", [Allowance(M, 100)])
        await app.ledger.upsert_org("o", "p")
        r = await app.ledger.reserve(Subject("o"), [Charge(M, 1)], idempotency_key="k")
        await app.ledger.commit(r.reservation_id, [Charge(M, 1)])
        lag = await app.lag_monitor.refresh()
        waiting = sum(n for n, _ in lag.values())
        assert waiting >= 2  # the reserve and the commit (and the configuration's entries)
        assert await sync_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert app.health is not None
        assert app.health.details()["sync_entries_waiting"] == waiting
        text = await _metrics(app.metrics.port)
        assert _gauge(text, "quotagate_sync_lag_entries") == waiting

        # another process (here: a Syncer of its own) copies them to SQL
        sink = open_sink(f"sqlite:///{tmp_path / 'q.db'}")
        try:
            syncer = Syncer(app.redis, app.ledger.keys, sink, app.ledger.catalog,
                            SyncOptions())
            inserted = 0
            for _ in range(10):  # a round reads each shard once; until nothing waits
                inserted += (await syncer.run_once()).inserted
                if not sum(n for n, _ in (await app.lag_monitor.refresh()).values()):
                    break
            assert inserted == waiting
        finally:
            await sink.close()
        assert sum(n for n, _ in (await app.lag_monitor.refresh()).values()) == 0
        assert await sync_status() == health_pb2.HealthCheckResponse.SERVING
        assert _gauge(await _metrics(app.metrics.port), "quotagate_sync_lag_entries") == 0
    finally:
        await ch.close()
        await app.stop()


async def test_quotagate_sync_serves_its_lag_on_metrics(
        redis_server: Any, redis: Any, tmp_path: Path) -> None:
    """`quotagate sync` as its own process (the Kubernetes sidecar layout, the Helm
    chart's sync Deployment): its /metrics on QUOTAGATE_METRICS_LISTEN carries the lag
    gauges, which fall to zero as it copies what waited."""
    app = await App(Settings(
        listen="127.0.0.1:0", redis_url=redis_server.url, data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'q.db'}", sync_in_process=False,
        metrics_listen="127.0.0.1:0", grace_seconds=0, notify_in_process=False)).start()
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("p", [Allowance(M, 100)])
        await app.ledger.upsert_org("o", "p")
        await app.ledger.reserve(Subject("o"), [Charge(M, 1)], idempotency_key="k")
        streams = [app.ledger.keys.ledger(s) for s in range(app.ledger.keys.shards)]
    finally:
        await app.stop()
    assert sum([await redis.xlen(k) for k in streams]) >= 1  # waiting for a syncer
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env.update(QUOTAGATE_REDIS_URL=redis_server.url,
               QUOTAGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'q.db'}",
               QUOTAGATE_DATA_DIR=str(tmp_path / "sync"),
               QUOTAGATE_METRICS_LISTEN=f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotagate", "sync", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        text = ""
        for _ in range(300):  # until it listens and has measured the lag once caught up
            if proc.returncode is not None:
                break
            try:
                text = await _metrics(port)
            except OSError:
                text = ""
            if "quotagate_sync_lag_entries{" in text and \
                    _gauge(text, "quotagate_sync_lag_entries") == 0:
                break
            await asyncio.sleep(0.1)
        assert proc.returncode is None, await proc.stderr.read() if proc.stderr else ""
        assert "quotagate_sync_lag_entries{" in text and "quotagate_sync_lag_seconds{" in text
        assert _gauge(text, "quotagate_sync_lag_entries") == 0
        assert sum([await redis.xlen(k) for k in streams]) == 0  # it did copy them
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
