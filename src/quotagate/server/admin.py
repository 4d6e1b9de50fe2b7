"""AdminService: configuration and money movement. RPCs of later milestones answer
UNIMPLEMENTED (the generated base class)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from quotagate.errors import InvalidArgument
from quotagate.ledger import model
from quotagate.ledger.store import Ledger
from quotagate.server import convert as cv
from quotagate.server.status import translated
from quotagate.sync.sink import GROUP_COLUMNS, Sink, UsageQuery
from quotagate.v1 import admin_pb2, admin_pb2_grpc

#: the largest part of a Redis stream id ("<ms>-<seq>", each an unsigned 64-bit number)
_MAX_ID_PART = 2**64 - 1

#: WatchEvents' initial metadata: the cursor the stream continues from (see admin.proto)
CURSOR_HEADER = "quotagate-cursor"


def _flag(request: Any, name: str) -> bool:
    """An `optional bool` left out means true: a new org has AI on, a new assistant is on."""
    return bool(getattr(request, name)) if request.HasField(name) else True


def parse_cursor(cursor: str) -> tuple[int, int] | None:
    """An event's cursor (a stream entry id "<ms>-<seq>") as a comparable pair; None for
    empty. Anything else is INVALID_ARGUMENT naming `after`."""
    from quotagate.errors import InvalidArgument

    if not cursor:
        return None
    bad = InvalidArgument("must be an event's cursor (\"<ms>-<seq>\")", "after")
    ms, sep, seq = cursor.partition("-")
    # ASCII digits only: str.isdigit also takes "²", which int() refuses
    if len(cursor) > 41 or not (sep and ms.isascii() and ms.isdigit() and seq.isascii()
                                and seq.isdigit()):
        raise bad
    at = int(ms), int(seq)
    # each part a 64-bit number, and not the very last id: nothing can come after it
    if max(at) > _MAX_ID_PART or at == (_MAX_ID_PART, _MAX_ID_PART):
        raise bad
    return at


def _timestamp_ms(request: Any, name: str) -> int | None:
    """A Timestamp field in milliseconds; None when unset. One out of the Timestamp range
    (0001-01-01 to 9999-12-31, nanos 0 to 999,999,999) is INVALID_ARGUMENT naming it."""
    from quotagate.errors import InvalidArgument

    if not request.HasField(name):
        return None
    try:
        return int(getattr(request, name).ToMilliseconds())
    except ValueError:  # protobuf checks the range
        raise InvalidArgument("must be a valid Timestamp: seconds from 0001-01-01 to "
                              "9999-12-31 UTC, nanos from 0 to 999,999,999", name) from None


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

    def __init__(self, ledger: Ledger, usage: Sink | None = None) -> None:
        self.ledger = ledger
        self.usage = usage  # the SQL store ListUsage reads (quotagate.sync)

    @translated
    async def UpsertPlan(self, request: admin_pb2.UpsertPlanRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.UpsertPlanResponse:
        created = await self.ledger.upsert_plan(request.name, [
            model.Allowance(a.meter, a.monthly, a.per_seat, a.one_time)
            for a in request.allowances])
        return admin_pb2.UpsertPlanResponse(created=created)

    @translated
    async def UpsertOrg(self, request: admin_pb2.UpsertOrgRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.UpsertOrgResponse:
        if request.org_id == "*":  # API keys scoped to "*" mean every org
            raise InvalidArgument('"*" is reserved (an API key scoped to it means every '
                                  'org)', "org_id")
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

    @translated
    async def Transfer(self, request: admin_pb2.TransferRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.TransferResponse:
        bucket = {admin_pb2.BUCKET_MONTHLY: "monthly", admin_pb2.BUCKET_TOPUP: "topup"}.get(
            request.bucket, "")
        balances = await self.ledger.transfer(
            request.org_id, request.meter, request.amount, bucket,
            idempotency_key=request.idempotency_key, from_team_id=request.from_team_id,
            from_seat_id=request.from_seat_id, to_team_id=request.to_team_id,
            to_seat_id=request.to_seat_id)
        return admin_pb2.TransferResponse(balances=cv.balances_pb(balances))

    @translated
    async def Adjust(self, request: admin_pb2.AdjustRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.AdjustResponse:
        balances = await self.ledger.adjust(request.org_id, request.meter, request.delta,
                                            request.reason,
                                            idempotency_key=request.idempotency_key)
        return admin_pb2.AdjustResponse(balances=cv.balances_pb(balances))

    @translated
    async def SetAllocationTemplate(self, request: admin_pb2.SetAllocationTemplateRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> admin_pb2.SetAllocationTemplateResponse:
        mode = {admin_pb2.ALLOCATION_MODE_UNSPECIFIED: "",
                admin_pb2.ALLOCATION_MODE_PER_SEAT: "per_seat",
                admin_pb2.ALLOCATION_MODE_EVEN: "even",
                admin_pb2.ALLOCATION_MODE_CUSTOM: "custom"}.get(request.mode, "?")
        allocations = await self.ledger.set_allocation_template(
            request.org_id, request.meter, mode, request.per_seat, dict(request.custom))
        return admin_pb2.SetAllocationTemplateResponse(allocations=allocations)

    @translated
    async def SetOverage(self, request: admin_pb2.SetOverageRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.SetOverageResponse:
        await self.ledger.set_overage(request.org_id, request.meter, request.cap,
                                      request.unit_price_micros, request.bill_every_micros)
        return admin_pb2.SetOverageResponse()

    @translated
    async def SetAutoTopUp(self, request: admin_pb2.SetAutoTopUpRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.SetAutoTopUpResponse:
        await self.ledger.set_auto_topup(request.org_id, request.meter, request.threshold,
                                         request.amount, request.enabled,
                                         request.cooldown_seconds, request.max_per_period)
        return admin_pb2.SetAutoTopUpResponse()

    async def WatchEvents(self, request: admin_pb2.WatchEventsRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[admin_pb2.WatchEventsResponse]:
        """Every event of the org from now on, until cancelled; with `after`, first the
        events after that cursor that the shard's stream still holds (subscribed first,
        then read back, so none falls in between; one seen both ways is sent once)."""
        from quotagate.errors import QuotagateError
        from quotagate.events.hub import Overflow, hub_for, replay
        from quotagate.ledger import validate
        from quotagate.server.status import to_status

        def out(ev: Any) -> admin_pb2.WatchEventsResponse:
            return admin_pb2.WatchEventsResponse(event=admin_pb2.Event(
                id=ev.id, type=ev.type, org_id=ev.org_id, attributes=dict(ev.attributes),
                at=cv.ts(ev.at_ms), cursor=ev.entry_id))

        try:
            org = validate.ident(request.org_id, "org_id")
            after = parse_cursor(request.after)
            async with hub_for(self.ledger.redis, self.ledger.keys).subscription(org) as sub:
                last = after
                # Where this stream starts: a client cut off before the first event
                # resumes from here, and misses nothing that happened in between.
                await context.send_initial_metadata(
                    ((CURSOR_HEADER, request.after if after is not None else sub.start),))
                if after is not None:
                    async for ev in replay(self.ledger.redis, self.ledger.keys, org, after):
                        last = parse_cursor(ev.entry_id)
                        yield out(ev)
                async for ev in sub:
                    at = parse_cursor(ev.entry_id)
                    if last is not None and at is not None and at <= last:
                        continue  # already sent from the stream's history
                    yield out(ev)
        except QuotagateError as e:
            await context.abort_with_status(to_status(e))
        except Overflow as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    @translated
    async def ListUsage(self, request: admin_pb2.ListUsageRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.ListUsageResponse:
        """Charged minus refunded from the SQL store, grouped and paginated (keyset)."""
        from quotagate.errors import InvalidArgument, Unavailable
        from quotagate.ledger import validate

        org = validate.ident(request.org_id, "org_id")
        if request.meter:
            validate.meter(self.ledger.catalog, request.meter, "meter")
        group_by: list[str] = []
        for i, g in enumerate(request.group_by):
            if g not in GROUP_COLUMNS:
                raise InvalidArgument(f"unknown dimension {g!r}; one of "
                                      f"{', '.join(GROUP_COLUMNS)}", f"group_by[{i}]")
            if g not in group_by:
                group_by.append(g)
        start = _timestamp_ms(request, "start")
        end = _timestamp_ms(request, "end")
        if start is not None and end is not None and end < start:
            raise InvalidArgument("must not be before start", "end")
        if request.page_size < 0:
            raise InvalidArgument("must not be negative", "page_size")
        size = min(request.page_size or 100, 1000)
        fingerprint = hashlib.sha256(json.dumps(
            [org, request.meter, start, end, group_by]).encode()).hexdigest()[:16]
        after = None
        if request.page_token:
            try:
                tok = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
                after = tuple(str(v) for v in tok["a"])
                if tok["q"] != fingerprint or len(after) != len(group_by) + 1:
                    raise ValueError
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise InvalidArgument("is not a token of this query", "page_token") from e
        if self.usage is None:
            raise Unavailable("no SQL store configured for ListUsage")
        q = UsageQuery(org, request.meter, start, end, tuple(group_by), size + 1, after)
        try:
            rows = await self.usage.usage(q)
        except Exception as e:
            raise Unavailable(f"usage store unreachable: {e}") from e
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = base64.urlsafe_b64encode(json.dumps(
                {"a": list(rows[-1].key(group_by)), "q": fingerprint}).encode()).decode()
        return admin_pb2.ListUsageResponse(next_page_token=token, rows=[
            admin_pb2.UsageRow(group=dict(r.group), meter=r.meter, amount=r.amount)
            for r in rows])
