"""The built-in catalog's actions answer to the names DESIGN §1 gives them."""

from __future__ import annotations

import pytest

from conftest import Grpc
from grpc_api import Api, G, ch, sub
from quotagate.v1 import quota_pb2


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.plan("pro", monthly=2_000_000)
    await a.org()
    return a


@pytest.mark.parametrize(("action", "cost"), [("icebreaker", 10), ("ai_sequence", 50),
                                              ("ai_icebreaker", 10)])
async def test_reserve_by_documented_action_charges_its_price(api: Api, action: str,
                                                              cost: int) -> None:
    r = await api.q.Reserve(quota_pb2.ReserveRequest(subject=sub(), action=action,
                                                     idempotency_key=f"{action}-1"))
    assert r.decision == G and list(r.granted) == [ch(cost)]
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    b = await api.balance()
    assert (b.used, b.remaining) == (cost, 2_000_000 - cost)
