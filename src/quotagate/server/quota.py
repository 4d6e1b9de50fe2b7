"""QuotaService: the runtime calls. Each is one script run, one Redis round trip.

With `fail_open` (QUOTAGATE_FAIL_OPEN), a Reserve or Check that Redis cannot answer
(UNAVAILABLE) is answered as granted / active, without Redis: the Reserve under a
fail-open id (`open.` and 32 hex digits; real ids are `r<shard>.…`, keys.py), which holds
nothing, so its Commit, Refund and Extend are answered as done without Redis too (with
Redis back as well). Nothing of it is recorded. GetBalance, and Commit and Refund of a
real hold, stay UNAVAILABLE. Input is validated first, as on the normal path."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

import grpc

from quotagate import telemetry
from quotagate.errors import InvalidArgument, Unavailable
from quotagate.ledger import validate
from quotagate.ledger.model import Decision
from quotagate.ledger.store import TOKENS, Ledger
from quotagate.server import convert as cv
from quotagate.server.status import FAIL_OPEN, translated
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

SERVICE = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
_RESERVE, _CHECK, _EXTEND, _COMMIT, _REFUND = (
    telemetry.method_index(f"/{SERVICE}/{m}")
    for m in ("Reserve", "Check", "Extend", "Commit", "Refund"))
_GRANTED = Decision.GRANTED

#: reservation ids of fail-open grants; never a real one (keys.py: r<shard>.<32 hex>)
OPEN_PREFIX = "open."
_OPEN_ID = re.compile(r"^open\.[0-9a-f]{32}$")


def new_open_id() -> str:
    return OPEN_PREFIX + TOKENS.next()


def is_open_id(reservation_id: str) -> bool:
    return _OPEN_ID.fullmatch(reservation_id) is not None  # "$" would allow a final "\n"


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    SERVICE = SERVICE

    def __init__(self, ledger: Ledger, fail_open: bool = False) -> None:
        self.ledger = ledger
        self.fail_open = fail_open

    @translated
    async def Reserve(self, request: quota_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> quota_pb2.ReserveResponse:
        try:
            r = await self.ledger.reserve(
                cv.subject(request.subject), cv.charges(request.charges),
                idempotency_key=request.idempotency_key, action=request.action,
                feature=request.feature, ttl_seconds=request.ttl_seconds,
                allow_partial=request.allow_partial,
                labels=dict(request.labels) if request.labels else None)
        except Unavailable as e:
            if not self.fail_open:
                raise
            return self._open_reserve(request, e)
        telemetry.RPC.decided(_RESERVE, r.decision is _GRANTED, r.reason)
        out = quota_pb2.ReserveResponse(
            decision=cv.DECISION[r.decision], reason=cv.REASON[r.reason], silent=r.silent,
            reservation_id=r.reservation_id, expires_at=cv.ts(r.expires_at_ms))
        cv.add_charges(out.granted, r.granted)
        cv.add_balances(out.balances, r.balances)
        return out

    def _open_reserve(self, request: quota_pb2.ReserveRequest,
                      cause: Unavailable) -> quota_pb2.ReserveResponse:
        """Granted in full without Redis (the ledger validated the request already)."""
        led = self.ledger
        items = led.catalog.actions[request.action] if request.action \
            else cv.charges(request.charges)
        FAIL_OPEN.answered(_RESERVE, "Reserve", cause)
        return quota_pb2.ReserveResponse(
            decision=common_pb2.DECISION_GRANTED, reservation_id=new_open_id(),
            granted=cv.charges_pb(items),
            expires_at=cv.ts(led.clock.now_ms() + led._ttl_ms(request.ttl_seconds)))

    @staticmethod
    def _open_hold(reservation_id: str, e: InvalidArgument) -> bool:
        """Whether the ledger refused `reservation_id` for being a fail-open id: then the
        call is answered without Redis (nothing is held), once its other fields pass."""
        return e.field == "reservation_id" and is_open_id(reservation_id)

    @translated
    async def Commit(self, request: quota_pb2.CommitRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.CommitResponse:
        labels = dict(request.labels) if request.labels else None
        validate.ident(request.reservation_id, "reservation_id")
        validate.labels(labels)
        try:
            r = await self.ledger.commit(request.reservation_id, cv.charges(request.actual),
                                         labels)
        except InvalidArgument as e:
            if not self._open_hold(request.reservation_id, e):
                raise
            actual = validate.charges(self.ledger.catalog, cv.charges(request.actual),
                                      "actual", allow_zero=True, required=False)
            FAIL_OPEN.answered(_COMMIT, "Commit", request.reservation_id)
            return quota_pb2.CommitResponse(state=common_pb2.HOLD_STATE_COMMITTED,
                                            charged=cv.charges_pb(actual))
        out = quota_pb2.CommitResponse(state=cv.HOLD_STATE[r.state])
        cv.add_charges(out.charged, r.amounts)
        cv.add_balances(out.balances, r.balances)
        return out

    @translated
    async def Refund(self, request: quota_pb2.RefundRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.RefundResponse:
        validate.ident(request.reservation_id, "reservation_id")
        try:
            r = await self.ledger.refund(request.reservation_id, cv.charges(request.amount),
                                         request.reason)
        except InvalidArgument as e:
            if not self._open_hold(request.reservation_id, e):
                raise
            amount = validate.charges(self.ledger.catalog, cv.charges(request.amount),
                                      "amount", required=False)
            if len(request.reason) > 1024:
                raise InvalidArgument("must be at most 1024 characters", "reason") from None
            FAIL_OPEN.answered(_REFUND, "Refund", request.reservation_id)
            return quota_pb2.RefundResponse(state=common_pb2.HOLD_STATE_REFUNDED,
                                            refunded=cv.charges_pb(amount))
        out = quota_pb2.RefundResponse(state=cv.HOLD_STATE[r.state])
        cv.add_charges(out.refunded, r.amounts)
        cv.add_balances(out.balances, r.balances)
        return out

    @translated
    async def Extend(self, request: quota_pb2.ExtendRequest,
                     context: grpc.aio.ServicerContext) -> quota_pb2.ExtendResponse:
        validate.ident(request.reservation_id, "reservation_id")
        try:
            r = await self.ledger.extend(request.reservation_id,
                                         cv.charges(request.additional), request.ttl_seconds)
        except InvalidArgument as e:
            if not self._open_hold(request.reservation_id, e):
                raise
            led = self.ledger
            additional = validate.charges(led.catalog, cv.charges(request.additional),
                                          "additional", required=False)
            ttl_ms = led._ttl_ms(request.ttl_seconds)
            FAIL_OPEN.answered(_EXTEND, "Extend", request.reservation_id)
            return quota_pb2.ExtendResponse(
                decision=common_pb2.DECISION_GRANTED, granted=cv.charges_pb(additional),
                expires_at=cv.ts(led.clock.now_ms() + ttl_ms))
        telemetry.RPC.decided(_EXTEND, r.decision is _GRANTED, r.reason)
        return quota_pb2.ExtendResponse(decision=cv.DECISION[r.decision],
                                        reason=cv.REASON[r.reason],
                                        granted=cv.charges_pb(r.granted),
                                        expires_at=cv.ts(r.expires_at_ms))

    @translated
    async def Check(self, request: quota_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> quota_pb2.CheckResponse:
        try:
            r = await self.ledger.check(cv.subject(request.subject), request.meter,
                                        request.feature)
        except Unavailable as e:
            if not self.fail_open:
                raise
            FAIL_OPEN.answered(_CHECK, "Check", e)
            return quota_pb2.CheckResponse(active=True)
        telemetry.RPC.decided(_CHECK, r.active, r.reason)
        out = quota_pb2.CheckResponse(active=r.active, reason=cv.REASON[r.reason],
                                      silent=r.silent)
        cv.add_balances(out.balances, r.balances)
        return out

    @translated
    async def GetBalance(self, request: quota_pb2.GetBalanceRequest,
                         context: grpc.aio.ServicerContext) -> quota_pb2.GetBalanceResponse:
        b = await self.ledger.get_balance(cv.subject(request.subject), list(request.meters))
        out = quota_pb2.GetBalanceResponse()
        cv.add_balances(out.balances, b)
        return out

    async def WatchStatus(self, request: quota_pb2.WatchStatusRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[quota_pb2.WatchStatusResponse]:
        """The current status of each watched assistant (no ids: of every assistant the
        org has), then every change (events assistant.deactivated /
        assistant.reactivated of the org) until cancelled."""
        from quotagate.errors import QuotagateError
        from quotagate.events.hub import Overflow, hub_for
        from quotagate.ledger import validate
        from quotagate.ledger.model import Subject
        from quotagate.server.status import to_status

        try:
            org = validate.ident(request.org_id, "org_id")
            for i, a in enumerate(request.assistant_ids):  # the index as sent
                validate.ident(a, f"assistant_ids[{i}]")
            wanted = list(dict.fromkeys(request.assistant_ids))
            # subscribe first, then read the current status: no change falls in between
            async with hub_for(self.ledger.redis, self.ledger.keys).subscription(org) as sub:
                # every assistant registered now, when none were named
                for a in wanted or await self.ledger.assistants(org):
                    r = await self.ledger.check(Subject(org, assistant_id=a))
                    yield quota_pb2.WatchStatusResponse(
                        assistant_id=a, active=r.active, reason=cv.REASON[r.reason],
                        at=cv.ts(self.ledger.clock.now_ms()))
                async for ev in sub:
                    msg = status_pb(ev.type, ev.attributes, ev.at_ms)
                    if msg is not None and (not wanted or msg.assistant_id in wanted):
                        yield msg
        except QuotagateError as e:
            await context.abort_with_status(to_status(e))
        except Overflow as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))


#: attrs.reason of assistant.deactivated -> DenyReason; anything else is ASSISTANT_INACTIVE
STATUS_REASONS = {"ai": common_pb2.DENY_REASON_AI_DISABLED,
                  "ai_disabled": common_pb2.DENY_REASON_AI_DISABLED}


def status_pb(etype: str, attrs: Mapping[str, str],
              at_ms: int) -> quota_pb2.WatchStatusResponse | None:
    """An assistant event as a WatchStatus message; None for other events."""
    if etype == "assistant.deactivated":
        reason = STATUS_REASONS.get(attrs.get("reason", "").lower(),
                                    common_pb2.DENY_REASON_ASSISTANT_INACTIVE)
        return quota_pb2.WatchStatusResponse(assistant_id=attrs.get("assistant_id", ""),
                                             active=False, reason=reason, at=cv.ts(at_ms))
    if etype == "assistant.reactivated":
        return quota_pb2.WatchStatusResponse(assistant_id=attrs.get("assistant_id", ""),
                                             active=True,
                                             reason=common_pb2.DENY_REASON_UNSPECIFIED,
                                             at=cv.ts(at_ms))
    return None
