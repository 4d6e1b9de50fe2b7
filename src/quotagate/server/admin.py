"""AdminService: configuration and money movement. RPCs of later milestones answer
UNIMPLEMENTED (the generated base class)."""

from __future__ import annotations

from typing import Any

import grpc

from quotagate.ledger import model
from quotagate.ledger.store import Ledger
from quotagate.server import convert as cv
from quotagate.server.status import translated
from quotagate.v1 import admin_pb2, admin_pb2_grpc


def _flag(request: Any, name: str) -> bool:
    """An `optional bool` left out means true: a new org has AI on, a new assistant is on."""
    return bool(getattr(request, name)) if request.HasField(name) else True


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @translated
    async def UpsertPlan(self, request: admin_pb2.UpsertPlanRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.UpsertPlanResponse:
        created = await self.ledger.upsert_plan(request.name, [
            model.Allowance(a.meter, a.monthly, a.per_seat) for a in request.allowances])
        return admin_pb2.UpsertPlanResponse(created=created)

    @translated
    async def UpsertOrg(self, request: admin_pb2.UpsertOrgRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.UpsertOrgResponse:
        created = await self.ledger.upsert_org(request.org_id, request.plan, request.seats,
                                               request.period_anchor_day,
                                               _flag(request, "ai_enabled"))
        balances = await self.ledger.get_balance(model.Subject(request.org_id))
        return admin_pb2.UpsertOrgResponse(created=created, balances=cv.balances_pb(balances))

    @translated
    async def UpsertTeam(self, request: admin_pb2.UpsertTeamRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.UpsertTeamResponse:
        created = await self.ledger.upsert_team(request.org_id, request.team_id, request.seats)
        return admin_pb2.UpsertTeamResponse(created=created)

    @translated
    async def UpsertSeat(self, request: admin_pb2.UpsertSeatRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.UpsertSeatResponse:
        created = await self.ledger.upsert_seat(request.org_id, request.seat_id, request.team_id, [
            model.SeatLimit(lim.meter, lim.monthly_limit, lim.unlimited)
            for lim in request.limits])
        return admin_pb2.UpsertSeatResponse(created=created)

    @translated
    async def UpsertAssistant(self, request: admin_pb2.UpsertAssistantRequest,
                              context: grpc.aio.ServicerContext
                              ) -> admin_pb2.UpsertAssistantResponse:
        created = await self.ledger.upsert_assistant(request.org_id, request.assistant_id,
                                                     request.team_id, _flag(request, "enabled"))
        return admin_pb2.UpsertAssistantResponse(created=created)

    @translated
    async def SetFeature(self, request: admin_pb2.SetFeatureRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.SetFeatureResponse:
        await self.ledger.set_feature(request.org_id, request.feature, request.enabled,
                                      request.team_id)
        return admin_pb2.SetFeatureResponse()

    @translated
    async def TopUp(self, request: admin_pb2.TopUpRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.TopUpResponse:
        r = await self.ledger.topup(request.org_id, request.meter, request.amount,
                                    request.purchase_id, request.team_id, request.seat_id)
        return admin_pb2.TopUpResponse(applied=r.applied, balances=[cv.balance_pb(r.balance)])
