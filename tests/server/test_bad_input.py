"""Bad input: INVALID_ARGUMENT with a BadRequest naming the field, and nothing changes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import Grpc
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

M = "message_tokens"
BIG = 2**50 + 1


def subj(**kw: Any) -> Any:
    kw.setdefault("org_id", "acme")
    return common_pb2.Subject(**kw)


def reserve(**kw: Any) -> Any:
    kw.setdefault("subject", subj())
    kw.setdefault("idempotency_key", "k")
    if "charges" not in kw and "action" not in kw:
        kw["charges"] = [common_pb2.Charge(meter=M, amount=10)]
    return quota_pb2.ReserveRequest(**kw)


RESERVE_CASES = [
    (reserve(subject=subj(org_id="")), "subject.org_id"),
    (reserve(subject=common_pb2.Subject()), "subject.org_id"),
    (reserve(subject=subj(org_id="x" * 129)), "subject.org_id"),
    (reserve(subject=subj(org_id="bad\x00id")), "subject.org_id"),
    (reserve(subject=subj(team_id="t\n")), "subject.team_id"),
    (reserve(subject=subj(seat_id="s" * 200)), "subject.seat_id"),
    (reserve(subject=subj(assistant_id="\x7f")), "subject.assistant_id"),
    (reserve(idempotency_key=""), "idempotency_key"),
    (reserve(charges=[]), "charges"),
    (reserve(charges=[common_pb2.Charge(meter=M, amount=0)]), "charges[0].amount"),
    (reserve(charges=[common_pb2.Charge(meter=M, amount=-5)]), "charges[0].amount"),
    (reserve(charges=[common_pb2.Charge(meter=M, amount=BIG)]), "charges[0].amount"),
    (reserve(charges=[common_pb2.Charge(meter="gold", amount=1)]), "charges[0].meter"),
    (reserve(charges=[common_pb2.Charge(meter="", amount=1)]), "charges[0].meter"),
    (reserve(charges=[common_pb2.Charge(meter=M, amount=1), common_pb2.Charge(meter=M, amount=2)]),
     "charges[1].meter"),
    (reserve(action="no_such_action"), "action"),
    (reserve(ttl_seconds=-1), "ttl_seconds"),
    (reserve(ttl_seconds=86_401), "ttl_seconds"),
    (reserve(feature="f\x01"), "feature"),
    (reserve(allow_partial=True, charges=[common_pb2.Charge(meter=M, amount=1),
                                          common_pb2.Charge(meter="call_seconds", amount=1)]),
     "allow_partial"),
]


def violation(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    raise AssertionError("no BadRequest detail")


async def expect_invalid(call: Any, request: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert violation(e.value) == field
    assert field in (e.value.details() or "")


@pytest.fixture
async def seeded(server: Grpc, redis: Any) -> Grpc:
    await server.admin.UpsertPlan(admin_pb2.UpsertPlanRequest(name="pro", allowances=[
        admin_pb2.Allowance(meter=M, monthly=1_000)]))
    await server.admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro",
                                                            ai_enabled=True))
    return server


async def snapshot(redis: Any) -> dict[bytes, Any]:
    out = {}
    async for key in redis.scan_iter("qg:{*"):
        t = await redis.type(key)
        if t == b"hash":
            out[key] = await redis.hgetall(key)
        elif t == b"string":
            out[key] = await redis.get(key)
        elif t == b"stream":  # entries ever added: the syncer deletes what it copied
            out[key] = (await redis.xinfo_stream(key))["entries-added"]
        elif t == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
    return out


@pytest.mark.parametrize(("request_", "field"), RESERVE_CASES)
async def test_reserve_rejects(seeded: Grpc, redis: Any, request_: Any, field: str) -> None:
    before = await snapshot(redis)
    await expect_invalid(seeded.quota.Reserve, request_, field)
    assert await snapshot(redis) == before


async def test_other_rpcs_reject_bad_fields(seeded: Grpc, redis: Any) -> None:
    q, a = seeded.quota, seeded.admin
    held = await q.Reserve(reserve(idempotency_key="ok"))
    rid = held.reservation_id
    before = await snapshot(redis)
    cases = [
        (q.Commit, quota_pb2.CommitRequest(), "reservation_id"),
        (q.Commit, quota_pb2.CommitRequest(reservation_id="r1.nothex"), "reservation_id"),
        (q.Commit, quota_pb2.CommitRequest(reservation_id=rid, actual=[
            common_pb2.Charge(meter=M, amount=-1)]), "actual[0].amount"),
        (q.Commit, quota_pb2.CommitRequest(reservation_id=rid, actual=[
            common_pb2.Charge(meter=M, amount=BIG)]), "actual[0].amount"),
        (q.Commit, quota_pb2.CommitRequest(reservation_id=rid, actual=[
            common_pb2.Charge(meter="call_seconds", amount=1)]), "actual"),
        (q.Refund, quota_pb2.RefundRequest(reservation_id=rid, amount=[
            common_pb2.Charge(meter="gold", amount=1)]), "amount[0].meter"),
        (q.Extend, quota_pb2.ExtendRequest(reservation_id=rid, additional=[
            common_pb2.Charge(meter=M, amount=0)]), "additional[0].amount"),
        (q.Extend, quota_pb2.ExtendRequest(reservation_id=rid, ttl_seconds=10**6),
         "ttl_seconds"),
        (q.Check, quota_pb2.CheckRequest(subject=subj(org_id=""), meter=M), "subject.org_id"),
        (q.Check, quota_pb2.CheckRequest(subject=subj(), meter="gold"), "meter"),
        (q.GetBalance, quota_pb2.GetBalanceRequest(subject=subj(), meters=["gold"]),
         "meters[0]"),
        (a.TopUp, admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=0, purchase_id="p"),
         "amount"),
        (a.TopUp, admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=BIG, purchase_id="p"),
         "amount"),
        (a.TopUp, admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=5), "purchase_id"),
        (a.TopUp, admin_pb2.TopUpRequest(org_id="", meter=M, amount=5, purchase_id="p"),
         "org_id"),
        (a.TopUp, admin_pb2.TopUpRequest(org_id="acme", meter="gold", amount=5,
                                         purchase_id="p"), "meter"),
        (a.UpsertOrg, admin_pb2.UpsertOrgRequest(org_id="acme", plan="nope"), "plan"),
        (a.UpsertOrg, admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro",
                                                 period_anchor_day=29), "period_anchor_day"),
        (a.UpsertOrg, admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro", seats=-1), "seats"),
        (a.UpsertPlan, admin_pb2.UpsertPlanRequest(name="", allowances=[]), "name"),
        (a.UpsertPlan, admin_pb2.UpsertPlanRequest(name="x", allowances=[
            admin_pb2.Allowance(meter="gold", monthly=1)]), "allowances[0].meter"),
        (a.UpsertPlan, admin_pb2.UpsertPlanRequest(name="x", allowances=[
            admin_pb2.Allowance(meter=M, monthly=-1)]), "allowances[0].monthly"),
        (a.UpsertTeam, admin_pb2.UpsertTeamRequest(org_id="acme", team_id=""), "team_id"),
        (a.UpsertSeat, admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="s", limits=[
            admin_pb2.SeatLimit(meter="gold", monthly_limit=1)]), "limits[0].meter"),
        (a.UpsertSeat, admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="s", limits=[
            admin_pb2.SeatLimit(meter=M, monthly_limit=-3)]), "limits[0].monthly_limit"),
        (a.UpsertAssistant, admin_pb2.UpsertAssistantRequest(org_id="acme", assistant_id=""),
         "assistant_id"),
        (a.SetFeature, admin_pb2.SetFeatureRequest(org_id="acme", feature=""), "feature"),
    ]
    for call, req, field in cases:
        await expect_invalid(call, req, field)
    assert await snapshot(redis) == before


async def test_unknown_reservation_is_not_found(seeded: Grpc) -> None:
    rid = "r1." + "0" * 32
    for call, req in ((seeded.quota.Commit, quota_pb2.CommitRequest(reservation_id=rid)),
                      (seeded.quota.Refund, quota_pb2.RefundRequest(reservation_id=rid)),
                      (seeded.quota.Extend, quota_pb2.ExtendRequest(reservation_id=rid))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
