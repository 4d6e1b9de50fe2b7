"""The catalog's plans reach Redis whenever it answers: also when it was down at start,
and again after it came back without its data (README: applied "at every start")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from quotagate.app import App
from quotagate.settings import Settings
from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc
from redis_server import RedisServer, free_port


def _settings(port: int, data_dir: Path) -> Settings:
    return Settings(listen="127.0.0.1:0", redis_url=f"redis://127.0.0.1:{port}/0",
                    data_dir=data_dir, metrics_listen="127.0.0.1:0", grace_seconds=0,
                    redis_timeout_ms=200, sweep_interval_ms=600_000, shards=16)


@pytest.fixture
async def down_port() -> AsyncIterator[tuple[int, list[RedisServer]]]:
    """A free port with no Redis yet; the test starts one there (closed at the end)."""
    servers: list[RedisServer] = []
    yield free_port(), servers
    for srv in servers:
        srv.close()


async def _upsert_org_within(admin: Any, org: str, seconds: float) -> float:
    """UpsertOrg on the catalog plan `pro` until it succeeds; how long it took."""
    t0 = time.monotonic()
    last: grpc.aio.AioRpcError | None = None
    while time.monotonic() - t0 < seconds:
        try:
            await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id=org, plan="pro"),
                                  timeout=2)
            return time.monotonic() - t0
        except grpc.aio.AioRpcError as e:
            last = e
        await asyncio.sleep(0.1)
    raise AssertionError(f"UpsertOrg(plan=pro) still failing after {seconds}s: "
                         f"{last.code() if last else ''} {last.details() if last else ''}")


async def _monthly(quota: Any, org: str) -> int:
    r = await quota.GetBalance(quota_pb2.GetBalanceRequest(
        subject=common_pb2.Subject(org_id=org), meters=["message_tokens"]))
    return int(r.balances[0].monthly_granted)


async def test_redis_down_at_start_catalog_applied_once_it_answers(
        down_port: tuple[int, list[RedisServer]], tmp_path: Path) -> None:
    port, servers = down_port
    app = await App(_settings(port, tmp_path)).start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    admin, quota = admin_pb2_grpc.AdminServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        servers.append(RedisServer(port=port).start())
        assert await _upsert_org_within(admin, "acme", 8) < 8
        assert await _monthly(quota, "acme") == 2_000_000  # the built-in plan pro
    finally:
        await ch.close()
        await app.stop()


async def test_redis_back_without_its_data_gets_the_catalog_again(
        down_port: tuple[int, list[RedisServer]], tmp_path: Path) -> None:
    port, servers = down_port
    srv = RedisServer(port=port).start()
    servers.append(srv)
    app = await App(_settings(port, tmp_path)).start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    admin, quota = admin_pb2_grpc.AdminServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
    try:
        await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro"))
        srv.stop()  # no AOF, no RDB: it comes back empty
        srv.start()
        assert await _upsert_org_within(admin, "beta", 8) < 8
        assert await _monthly(quota, "beta") == 2_000_000
    finally:
        await ch.close()
        await app.stop()


def _seeded(port: int, data_dir: Path) -> Settings:
    s = _settings(port, data_dir)
    return s.model_copy(update={"catalog": str(Path(__file__).parents[1] / "examples" /
                                               "catalog.toml")})


async def test_the_seed_creates_missing_orgs_and_leaves_existing_ones(
        down_port: tuple[int, list[RedisServer]], tmp_path: Path) -> None:
    """The demo seed makes the orgs that do not exist yet; at the next start what an
    admin changed in a seeded org stays. Redis back without its data: the plans come
    back at once, the seeded orgs do not (`quotagate restore` brings the orgs back)."""
    port, servers = down_port
    srv = RedisServer(port=port).start()
    servers.append(srv)
    app = await App(_seeded(port, tmp_path)).start()
    try:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        admin, quota = admin_pb2_grpc.AdminServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
        assert await _monthly(quota, "demo") > 0
        await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="demo", plan="starter",
                                                         seats=5))
        await ch.close()
    finally:
        await app.stop()
    app = await App(_seeded(port, tmp_path)).start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    admin, quota = admin_pb2_grpc.AdminServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
    try:
        assert await _monthly(quota, "demo") == 100_000  # still on starter: not re-seeded
        srv.stop()  # no AOF, no RDB: it comes back empty
        srv.start()
        assert await _upsert_org_within(admin, "beta", 8) < 8  # plans are back
        r = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id="demo"), idempotency_key="k",
            charges=[common_pb2.Charge(meter="message_tokens", amount=1)]))
        assert r.reason == common_pb2.DENY_REASON_UNKNOWN_SUBJECT  # not made up again
    finally:
        await ch.close()
        await app.stop()


async def test_a_seed_cut_short_is_finished_at_the_next_start(
        down_port: tuple[int, list[RedisServer]], tmp_path: Path) -> None:
    """The seed's org was created, then the start was cut short (Redis went away, the
    process was killed) before its teams and seats: the org is still marked as being
    seeded, and the next start creates the rest."""
    import redis.asyncio as aioredis

    from quotagate import catalog
    from quotagate.clock import SystemClock
    from quotagate.ledger.keys import Keys
    from quotagate.ledger.store import Ledger

    port, servers = down_port
    servers.append(RedisServer(port=port).start())
    r = aioredis.Redis(port=port)
    cat = catalog.load(str(Path(__file__).parents[1] / "examples" / "catalog.toml"))
    keys = Keys(16)
    led = Ledger(r, cat.catalog, SystemClock(), keys)
    for name, allowances in cat.catalog.plans.items():
        await led.upsert_plan(name, allowances)
    await r.sadd(keys.seeding(), "demo")  # what the cut-short start left
    await led.upsert_org("demo", "pro", seats=5)
    await led.aclose()
    app = await App(_seeded(port, tmp_path)).start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    quota = quota_pb2_grpc.QuotaServiceStub(ch)
    try:
        got = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
            idempotency_key="k",
            charges=[common_pb2.Charge(meter="message_tokens", amount=1)]))
        assert got.decision == common_pb2.DECISION_GRANTED  # alice and her team exist now
        assert not await r.smembers(keys.seeding())
    finally:
        await ch.close()
        await app.stop()
        await r.aclose()
