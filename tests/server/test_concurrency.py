"""200 concurrent Reserves of random sizes against a wallet of N tokens, over gRPC."""

from __future__ import annotations

import asyncio
import random

from conftest import Grpc
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

M = "message_tokens"
N = 50_000


async def test_concurrent_reserves_never_overgrant(server: Grpc) -> None:
    a, q = server.admin, server.quota
    await a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="n", allowances=[
        admin_pb2.Allowance(meter=M, monthly=N)]))
    await a.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="race", plan="n", ai_enabled=True))
    rng = random.Random(7)
    sizes = [rng.randint(1, 800) for _ in range(200)]
    assert sum(sizes) > N  # the wallet cannot cover them all: some must be denied

    async def reserve(i: int, amount: int) -> quota_pb2.ReserveResponse:
        return await q.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id="race"),
            charges=[common_pb2.Charge(meter=M, amount=amount)], idempotency_key=f"c{i}"))

    answers = await asyncio.gather(*(reserve(i, s) for i, s in enumerate(sizes)))
    granted = [(r, s) for r, s in zip(answers, sizes, strict=True)
               if r.decision == common_pb2.DECISION_GRANTED]
    held = sum(s for _, s in granted)
    assert held <= N
    assert len(granted) < len(sizes)
    # Every denial saw less than it asked for at that moment: what is left is smaller
    # than the smallest denied request, or the wallet is full.
    left = N - held
    denied = [s for r, s in zip(answers, sizes, strict=True)
              if r.decision != common_pb2.DECISION_GRANTED]
    assert left < max(denied)

    # Resolve all of them concurrently: commit a random part of some, refund the rest.
    committed = 0
    calls = []
    for i, (r, s) in enumerate(granted):
        if i % 3 == 0:
            calls.append(q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id)))
        else:
            used = rng.randint(0, s)
            committed += used
            calls.append(q.Commit(quota_pb2.CommitRequest(
                reservation_id=r.reservation_id,
                actual=[common_pb2.Charge(meter=M, amount=used)])))
    # Each one twice at the same time: still resolved exactly once.
    results = await asyncio.gather(*calls, *[
        q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id))
        if i % 3 == 0 else q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
        for i, (r, _) in enumerate(granted)])
    assert len(results) == 2 * len(granted)
    b = (await q.GetBalance(quota_pb2.GetBalanceRequest(
        subject=common_pb2.Subject(org_id="race"), meters=[M]))).balances[0]
    assert (b.used, b.reserved, b.remaining) == (committed, 0, N - committed)
