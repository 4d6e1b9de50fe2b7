"""Small helpers over the gRPC stubs so each test reads as the behaviour it checks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from conftest import Grpc
from quotagate.events.hub import hub_for
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

M = "message_tokens"
G, D = common_pb2.DECISION_GRANTED, common_pb2.DECISION_DENIED


async def subscribed(server: Grpc, n: int = 1) -> None:
    """Wait until the server's event hub has `n` subscribers (the stream is open)."""
    assert server.app.ledger is not None
    hub = hub_for(server.app.ledger.redis, server.app.ledger.keys)
    deadline = time.monotonic() + 5
    while hub.subscribers < n:
        assert time.monotonic() < deadline, "the stream never subscribed"
        await asyncio.sleep(0.01)


async def next_msg(call: Any, within: float = 5.0) -> Any:
    """The next message of a server stream, within `within` seconds."""
    return await asyncio.wait_for(call.read(), within)


def sub(org: str = "acme", team: str = "", seat: str = "", assistant: str = "") -> Any:
    return common_pb2.Subject(org_id=org, team_id=team, seat_id=seat, assistant_id=assistant)


def ch(amount: int, meter: str = M) -> Any:
    return common_pb2.Charge(meter=meter, amount=amount)


class Api:
    """The stubs of a running server, with shortcuts."""

    def __init__(self, s: Grpc) -> None:
        self.q, self.a, self.n = s.quota, s.admin, 0

    async def plan(self, name: str, monthly: int = 0, per_seat: int = 0, meter: str = M) -> None:
        await self.a.UpsertPlan(admin_pb2.UpsertPlanRequest(name=name, allowances=[
            admin_pb2.Allowance(meter=meter, monthly=monthly, per_seat=per_seat)]))

    async def org(self, org: str = "acme", plan: str = "pro", seats: int = 0, anchor: int = 0,
                  ai: bool = True) -> None:
        await self.a.UpsertOrg(admin_pb2.UpsertOrgRequest(
            org_id=org, plan=plan, seats=seats, period_anchor_day=anchor, ai_enabled=ai))

    async def reserve(self, amount: int | list[Any], s: Any = None, **kw: Any) -> Any:
        self.n += 1
        charges = amount if isinstance(amount, list) else [ch(amount)]
        kw.setdefault("idempotency_key", f"key-{self.n}")
        return await self.q.Reserve(quota_pb2.ReserveRequest(
            subject=s or sub(), charges=charges, **kw))

    async def use(self, amount: int, s: Any = None) -> Any:
        r = await self.reserve(amount, s)
        assert r.decision == G, r
        return await self.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))

    async def balance(self, s: Any = None, meter: str = M) -> Any:
        resp = await self.q.GetBalance(quota_pb2.GetBalanceRequest(subject=s or sub(),
                                                                   meters=[meter]))
        return resp.balances[0]

    async def topup(self, amount: int, purchase: str, org: str = "acme", **kw: Any) -> Any:
        return await self.a.TopUp(admin_pb2.TopUpRequest(
            org_id=org, meter=kw.pop("meter", M), amount=amount, purchase_id=purchase, **kw))
