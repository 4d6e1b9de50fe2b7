"""Envoy's rate-limit service, `envoy.service.ratelimit.v3.RateLimitService`, served on
quotagate's own port: an Envoy in front of an AI endpoint asks before each request, and
quotagate charges it against the wallet at once (DESIGN §4).

Each descriptor of a `ShouldRateLimit` request is one charge. Its entries say whose and
what (keys as in the Envoy route's `rate_limits` actions, e.g. `request_headers` with
`descriptor_key: org_id`):

    org_id (required)   team_id   seat_id   assistant_id      the subject
    meter               the meter charged (default: the catalog's default meter)
    action              a priced action of the catalog (its price, per hit), instead of meter
    feature             the feature switch the request needs

The amount is the descriptor's `hits_addend` when set, else the request's, else 1 (as
Envoy counts). A descriptor whose `hits_addend` is set to 0 charges nothing: it only asks
whether the subject could pay (a Check). Each descriptor that fits is charged at once
(Reserve and Commit in one step, nothing left held); one that does not fit is denied and
changes nothing; the answer is OVER_LIMIT when any descriptor was denied. Descriptors are
independent, as in Envoy's own rate-limit service: a request whose second descriptor is
denied has still been charged for its first.

Per descriptor the answer carries the meter's figures: `limit_remaining` (what the
subject can still spend), `current_limit` (the period's total, unit MONTH for counter
meters) and `duration_until_reset` (to the end of the billing period), so Envoy can send
`x-ratelimit-*` headers. A denial adds `x-quotagate-reason` (the DenyReason, e.g.
`insufficient_balance`, `seat_limit_reached`, `assistant_inactive`) to the 429, and
`x-quotagate-silent: true` where the runtime should hide the assistant rather than show
an error (DESIGN §2).

Bad input (no descriptor, no `org_id`, an unknown entry key or meter) is INVALID_ARGUMENT
naming the field, and nothing of the request is charged. Redis unreachable is
UNAVAILABLE: Envoy's `failure_mode_deny` decides whether the request goes on. With
`fail_open` (QUOTAGATE_FAIL_OPEN) quotagate decides instead: each descriptor Redis could
not answer is OK (no figures, nothing charged or recorded), so the answer is OK unless
another descriptor was really denied.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from quotagate import telemetry
from quotagate.envoy import rls_pb2, rls_pb2_grpc
from quotagate.errors import InvalidArgument, Unavailable
from quotagate.ledger import validate
from quotagate.ledger.model import (
    Charge,
    ChargeResult,
    Decision,
    DenyReason,
    MeterBalance,
    MeterKind,
    Subject,
)
from quotagate.ledger.store import Ledger
from quotagate.server.status import FAIL_OPEN, translated

SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
ENTRY_KEYS = ("org_id", "team_id", "seat_id", "assistant_id", "meter", "action", "feature")
UINT32_MAX = 2**32 - 1
_METHOD = telemetry.method_index(f"/{SERVICE}/ShouldRateLimit")

Response = rls_pb2.RateLimitResponse
OK, OVER_LIMIT = Response.OK, Response.OVER_LIMIT
MONTH, NO_UNIT = Response.RateLimit.MONTH, Response.RateLimit.UNKNOWN
#: a descriptor answered without Redis (fail-open)
_OPEN = ChargeResult(Decision.GRANTED, DenyReason.NONE, False, (), ())


@dataclass(frozen=True, slots=True)
class _Ask:
    """One descriptor, validated: what to charge (amount 0: only check)."""

    subject: Subject
    charges: tuple[Charge, ...]
    action: str
    feature: str
    check_only: bool


def _clamp(n: int) -> int:
    return max(0, min(n, UINT32_MAX))


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    SERVICE = SERVICE

    def __init__(self, ledger: Ledger, fail_open: bool = False) -> None:
        self.ledger = ledger
        self.fail_open = fail_open

    def _ask(self, i: int, d: object, hits: int) -> _Ask:
        where = f"descriptors[{i}]"
        found: dict[str, str] = {}
        for j, e in enumerate(d.entries):  # type: ignore[attr-defined]
            if e.key not in ENTRY_KEYS:
                raise InvalidArgument(f"unknown entry key {e.key!r} (quotagate reads "
                                      f"{', '.join(ENTRY_KEYS)})", f"{where}.entries[{j}].key")
            if e.key in found:
                raise InvalidArgument(f"entry {e.key!r} appears twice",
                                      f"{where}.entries[{j}].key")
            found[e.key] = e.value
        subject = validate.subject(Subject(found.get("org_id", ""), found.get("team_id", ""),
                                           found.get("seat_id", ""),
                                           found.get("assistant_id", "")), where)
        feature = validate.ident(found.get("feature", ""), f"{where}.feature", required=False)
        if d.HasField("hits_addend"):  # type: ignore[attr-defined]
            hits = d.hits_addend.value  # type: ignore[attr-defined]
        validate.amount(hits, f"{where}.hits_addend", allow_zero=True)
        catalog = self.ledger.catalog
        action = found.get("action", "")
        if action:
            if "meter" in found:
                raise InvalidArgument("give either meter or action, not both",
                                      f"{where}.action")
            validate.ident(action, f"{where}.action")
            priced = catalog.actions.get(action)
            if priced is None:
                raise InvalidArgument(f"unknown action {action!r}", f"{where}.action")
            charges = tuple(Charge(c.meter, c.amount * max(hits, 1)) for c in priced)
            for c in charges:
                validate.amount(c.amount, f"{where}.hits_addend")
        else:
            meter = found.get("meter", "") or catalog.default_meter
            validate.meter(catalog, meter, f"{where}.meter")
            charges = (Charge(meter, max(hits, 1)),)
        return _Ask(subject, charges, action, feature, hits == 0)

    async def _run(self, ask: _Ask) -> ChargeResult:
        if ask.check_only:
            c = await self.ledger.check(ask.subject, ask.charges[0].meter, ask.feature)
            return ChargeResult(Decision.GRANTED if c.active else Decision.DENIED, c.reason,
                                c.silent, (), c.balances)
        return await self.ledger.charge_now(ask.subject, ask.charges, action=ask.action,
                                            feature=ask.feature)

    def _status(self, r: ChargeResult, now_ms: int) -> rls_pb2.RateLimitResponse.DescriptorStatus:
        st = Response.DescriptorStatus(
            code=OK if r.decision is Decision.GRANTED else OVER_LIMIT)
        if r.balances:
            b: MeterBalance = r.balances[0]
            counter = self.ledger.catalog.meters.get(b.meter) is MeterKind.COUNTER
            st.current_limit.name = b.meter
            st.current_limit.requests_per_unit = _clamp(b.total)
            st.current_limit.unit = MONTH if counter else NO_UNIT
            st.limit_remaining = _clamp(b.remaining)
            if counter and b.period_end_ms > now_ms:
                st.duration_until_reset.FromMilliseconds(b.period_end_ms - now_ms)
        return st

    async def _run_open(self, asks: list[_Ask]) -> list[ChargeResult]:
        """Every descriptor run; those Redis could not answer are OK (fail-open)."""
        got = await asyncio.gather(*(self._run(a) for a in asks), return_exceptions=True)
        out: list[ChargeResult] = []
        cause: Unavailable | None = None
        for r in got:
            if isinstance(r, Unavailable):
                cause, r = r, _OPEN
            elif isinstance(r, BaseException):
                raise r
            out.append(r)
        if cause is not None:
            FAIL_OPEN.answered(_METHOD, "ShouldRateLimit", cause)
        return out

    @translated
    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest,
                              context: grpc.aio.ServicerContext) -> rls_pb2.RateLimitResponse:
        if not request.descriptors:
            raise InvalidArgument("at least one descriptor is required", "descriptors")
        hits = request.hits_addend or 1
        # every descriptor is checked before anything is charged
        asks = [self._ask(i, d, hits) for i, d in enumerate(request.descriptors)]
        if self.fail_open:
            results = await self._run_open(asks)
        else:
            results = await asyncio.gather(*(self._run(a) for a in asks))
        now = self.ledger.clock.now_ms()
        for r in results:
            if r is not _OPEN:
                telemetry.RPC.decided(_METHOD, r.decision is Decision.GRANTED, r.reason)
        out = Response(overall_code=OK, statuses=[self._status(r, now) for r in results])
        denied = [r for r in results if r.decision is not Decision.GRANTED]
        if denied:
            out.overall_code = OVER_LIMIT
            out.response_headers_to_add.add(key="x-quotagate-reason",
                                            value=denied[0].reason.name.lower())
            if any(r.silent for r in denied):
                out.response_headers_to_add.add(key="x-quotagate-silent", value="true")
        return out
