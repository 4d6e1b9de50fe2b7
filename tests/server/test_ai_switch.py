"""UpsertOrg(ai_enabled=false) reaches WatchStatus: every assistant of the org goes
inactive with DENY_REASON_AI_DISABLED, and comes back when AI is switched on again."""

from __future__ import annotations

from conftest import Grpc
from grpc_api import next_msg, subscribed
from quotagate.clock import ManualClock
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

M = "message_tokens"






async def ai(server: Grpc, enabled: bool) -> None:
    await server.admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="p",
                                                            ai_enabled=enabled))


async def test_watch_status_follows_the_org_ai_switch(server: Grpc, clock: ManualClock) -> None:
    a = server.admin
    await a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="p", allowances=[
        admin_pb2.Allowance(meter=M, monthly=1_000)]))
    await ai(server, True)
    await a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(org_id="acme",
                                                             assistant_id="bot", enabled=True))
    await a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(org_id="acme",
                                                             assistant_id="off", enabled=False))
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="acme"))
    first = [await next_msg(call) for _ in range(2)]
    assert [(m.assistant_id, m.active) for m in first] == [("bot", True), ("off", False)]
    await subscribed(server)

    await ai(server, False)
    got = [await next_msg(call) for _ in range(2)]
    assert [(m.assistant_id, m.active, m.reason) for m in got] == [
        ("bot", False, common_pb2.DENY_REASON_AI_DISABLED),
        ("off", False, common_pb2.DENY_REASON_AI_DISABLED)]
    check = await server.quota.Check(quota_pb2.CheckRequest(
        subject=common_pb2.Subject(org_id="acme", assistant_id="bot"), meter=M))
    assert (check.active, check.reason) == (False, common_pb2.DENY_REASON_AI_DISABLED)

    clock.advance(1_000)
    await ai(server, True)
    got = [await next_msg(call) for _ in range(2)]
    assert [(m.assistant_id, m.active, m.reason) for m in got] == [
        ("bot", True, common_pb2.DENY_REASON_UNSPECIFIED),
        ("off", False, common_pb2.DENY_REASON_ASSISTANT_INACTIVE)]  # still disabled
    assert got[0].at.ToMilliseconds() == clock.now_ms()
    check = await server.quota.Check(quota_pb2.CheckRequest(
        subject=common_pb2.Subject(org_id="acme", assistant_id="bot"), meter=M))
    assert check.active
    call.cancel()
