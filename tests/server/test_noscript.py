"""After SCRIPT FLUSH and FUNCTION FLUSH (or a Redis restart without persistence) calls
still work: what is missing is loaded again."""

from __future__ import annotations

from typing import Any

from conftest import Grpc
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2


async def test_calls_survive_script_flush(server: Grpc, redis: Any) -> None:
    await server.admin.UpsertPlan(admin_pb2.UpsertPlanRequest(name="p", allowances=[
        admin_pb2.Allowance(meter="message_tokens", monthly=100)]))
    await server.admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="o", plan="p",
                                                            ai_enabled=True))
    req = quota_pb2.ReserveRequest(subject=common_pb2.Subject(org_id="o"), idempotency_key="a",
                                   charges=[common_pb2.Charge(meter="message_tokens", amount=5)])
    first = await server.quota.Reserve(req)
    await redis.script_flush()
    await redis.function_flush()
    assert not any(await redis.script_exists(server.app.ledger.scripts.commit.sha))
    c = await server.quota.Commit(quota_pb2.CommitRequest(reservation_id=first.reservation_id))
    assert c.state == common_pb2.HOLD_STATE_COMMITTED
    await redis.script_flush()
    await redis.function_flush()
    req.idempotency_key = "b"
    assert (await server.quota.Reserve(req)).decision == common_pb2.DECISION_GRANTED
    b = (await server.quota.GetBalance(quota_pb2.GetBalanceRequest(
        subject=common_pb2.Subject(org_id="o")))).balances
    assert {x.meter: (x.used, x.reserved) for x in b}["message_tokens"] == (5, 5)
    # Health reloads the scripts into the cache and keeps reporting SERVING.
    await redis.script_flush()
    assert await server.app.health.update()  # type: ignore[union-attr]
    assert all(await redis.script_exists(server.app.ledger.scripts.reserve.sha))
