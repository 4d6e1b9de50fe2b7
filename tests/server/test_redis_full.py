"""Redis at maxmemory: the spend path answers UNAVAILABLE, changes nothing, and works
again (the hold it could not commit included) once Redis has room."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conftest import CLUSTER, Grpc
from grpc_api import Api, ch, sub
from quotagate.v1 import quota_pb2

pytestmark = pytest.mark.skipif(CLUSTER, reason="sets maxmemory on a single server")


async def test_out_of_memory_is_unavailable_and_loses_nothing(server: Grpc, redis: Any) -> None:
    api = Api(server)
    await api.plan("pro", monthly=1_000)
    await api.org()
    held = await api.q.Reserve(quota_pb2.ReserveRequest(
        subject=sub(), charges=[ch(100)], idempotency_key="before"))
    before = await api.balance()
    await redis.config_set("maxmemory", "1")
    try:
        for call in (api.q.Reserve(quota_pb2.ReserveRequest(
                         subject=sub(), charges=[ch(10)], idempotency_key="during")),
                     api.q.Commit(quota_pb2.CommitRequest(
                         reservation_id=held.reservation_id))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "out of memory" in (e.value.details() or "")
    finally:
        await redis.config_set("maxmemory", "0")
    after = await api.balance()
    assert (after.used, after.reserved) == (before.used, before.reserved) == (0, 100)
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id))
    assert [x.amount for x in c.charged] == [100]
    assert (await api.balance()).used == 100
