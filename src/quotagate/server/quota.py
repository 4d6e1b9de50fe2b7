"""QuotaService: the runtime calls. Each is one script run, one Redis round trip."""

from __future__ import annotations

import grpc

from quotagate.ledger.store import Ledger
from quotagate.server import convert as cv
from quotagate.server.status import translated
from quotagate.v1 import quota_pb2, quota_pb2_grpc


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @translated
    async def Reserve(self, request: quota_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> quota_pb2.ReserveResponse:
        r = await self.ledger.reserve(
            cv.subject(request.subject), cv.charges(request.charges),
            idempotency_key=request.idempotency_key, action=request.action,
            feature=request.feature, ttl_seconds=request.ttl_seconds,
            allow_partial=request.allow_partial, labels=dict(request.labels))
        return quota_pb2.ReserveResponse(
            decision=cv.DECISION[r.decision], reason=cv.REASON[r.reason], silent=r.silent,
            reservation_id=r.reservation_id, granted=cv.charges_pb(r.granted),
            expires_at=cv.ts(r.expires_at_ms), balances=cv.balances_pb(r.balances))

    @translated
    async def Commit(self, request: quota_pb2.CommitRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.CommitResponse:
        r = await self.ledger.commit(request.reservation_id, cv.charges(request.actual),
                                     dict(request.labels))
        return quota_pb2.CommitResponse(state=cv.HOLD_STATE[r.state],
                                        charged=cv.charges_pb(r.amounts),
                                        balances=cv.balances_pb(r.balances))

    @translated
    async def Refund(self, request: quota_pb2.RefundRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.RefundResponse:
        r = await self.ledger.refund(request.reservation_id, cv.charges(request.amount),
                                     request.reason)
        return quota_pb2.RefundResponse(state=cv.HOLD_STATE[r.state],
                                        refunded=cv.charges_pb(r.amounts),
                                        balances=cv.balances_pb(r.balances))

    @translated
    async def Extend(self, request: quota_pb2.ExtendRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.ExtendResponse:
        r = await self.ledger.extend(request.reservation_id, cv.charges(request.additional),
                                     request.ttl_seconds)
        return quota_pb2.ExtendResponse(decision=cv.DECISION[r.decision],
                                        reason=cv.REASON[r.reason],
                                        granted=cv.charges_pb(r.granted),
                                        expires_at=cv.ts(r.expires_at_ms))

    @translated
    async def Check(self, request: quota_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> quota_pb2.CheckResponse:
        r = await self.ledger.check(cv.subject(request.subject), request.meter, request.feature)
        return quota_pb2.CheckResponse(active=r.active, reason=cv.REASON[r.reason],
                                       silent=r.silent, balances=cv.balances_pb(r.balances))

    @translated
    async def GetBalance(self, request: quota_pb2.GetBalanceRequest,
                         context: grpc.aio.ServicerContext) -> quota_pb2.GetBalanceResponse:
        b = await self.ledger.get_balance(cv.subject(request.subject), list(request.meters))
        return quota_pb2.GetBalanceResponse(balances=cv.balances_pb(b))
