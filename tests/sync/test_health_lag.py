"""Sync lag is visible in health: the quotagate.v1.Sync service and Health.details()."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotagate.app import App
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.settings import Settings


async def sync_status(app: App, ch: grpc.aio.Channel) -> int:
    assert app.health is not None
    await app.health.update()
    r = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="quotagate.v1.Sync"))
    return int(r.status)


async def test_sync_lag_shows_in_health(redis_server: Any, redis: Any, tmp_path: Path) -> None:
    async def run(database_url: str) -> tuple[list[int], dict[str, object]]:
        app = await App(Settings(
            listen="127.0.0.1:0", redis_url=redis_server.url, data_dir=tmp_path,
            database_url=database_url, sync_lag_alert_seconds=0, sync_poll_ms=50,
            metrics_listen="127.0.0.1:0", grace_seconds=0, notify_in_process=False)).start()
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        try:
            assert app.ledger is not None and app.health is not None
            await app.ledger.upsert_plan("p", [Allowance("message_tokens", 100)])
            await app.ledger.upsert_org("o", "p")
            await app.ledger.reserve(Subject("o"), [Charge("message_tokens", 1)],
                                     idempotency_key=database_url)
            seen = []
            for _ in range(60):  # the syncer refreshes its lag about once a second
                await asyncio.sleep(0.1)
                seen.append(await sync_status(app, ch))
            return seen, app.health.details()
        finally:
            await ch.close()
            await app.stop()

    seen, details = await run("postgresql://postgres@127.0.0.1:1/nowhere")  # SQL down
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert int(details["sync_entries_waiting"]) >= 1  # type: ignore[call-overload]
    assert details["sync_lag_by_shard"]
    assert details["serving"] is True  # the sidecar itself keeps serving
    seen, details = await run(f"sqlite:///{tmp_path / 'ok.db'}")  # SQL up: catches up
    assert seen[-1] == health_pb2.HealthCheckResponse.SERVING
    assert details["sync_entries_waiting"] == 0
