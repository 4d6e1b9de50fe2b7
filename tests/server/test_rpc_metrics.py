"""The RPC statistics on /metrics: calls by method and status code, their latency, and
what Reserve, Check and Envoy's ShouldRateLimit decided, read from the real endpoint."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Grpc
from grpc_api import Api, sub
from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc
from quotagate.v1 import quota_pb2

Q = "quotagate.v1.QuotaService"
RLS = "envoy.service.ratelimit.v3.RateLimitService"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_calls_codes_latency_and_decisions_are_counted(server: Grpc) -> None:
    assert server.app.metrics is not None
    port = server.app.metrics.port
    api = Api(server)
    await api.plan("pro", monthly=1_000)
    await api.org("acme")
    before = await asyncio.to_thread(scrape, port)
    granted = await api.reserve(600)
    denied = await api.reserve(600)  # an answer, not an error: code OK
    assert denied.reason != 0
    with pytest.raises(grpc.aio.AioRpcError):
        await api.reserve(0)  # INVALID_ARGUMENT
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=granted.reservation_id))
    await api.q.Check(quota_pb2.CheckRequest(subject=sub(), meter="message_tokens"))
    rls = rls_pb2_grpc.RateLimitServiceStub(server.channel)
    await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="ai", hits_addend=300, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="acme")])]))
    await asyncio.sleep(0.3)  # a call is counted just after it is answered
    after = await asyncio.to_thread(scrape, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    req = "quotagate_rpc_requests_total"
    assert delta(req, service=Q, method="Reserve", code="OK") == 2
    assert delta(req, service=Q, method="Reserve", code="INVALID_ARGUMENT") == 1
    assert delta(req, service=Q, method="Commit", code="OK") == 1
    assert delta(req, service=RLS, method="ShouldRateLimit", code="OK") == 1
    dec = "quotagate_decisions_total"
    assert delta(dec, method="Reserve", decision="granted", reason="none") == 1
    assert delta(dec, method="Reserve", decision="denied", reason="insufficient_balance") == 1
    assert delta(dec, method="Check", decision="granted", reason="none") == 1
    # 400 left of 1,000 after the commit: 300 fit
    assert delta(dec, method="ShouldRateLimit", decision="granted", reason="none") == 1
    # the latency histogram: every Reserve in it, buckets cumulative up to +Inf
    h = "quotagate_rpc_duration_seconds"
    assert delta(h + "_count", service=Q, method="Reserve") == 3
    assert delta(h + "_sum", service=Q, method="Reserve") > 0
    les = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                 if k[0] == h + "_bucket" and dict(k[1])["method"] == "Reserve")
    counts = [v for _, v in les]
    assert counts == sorted(counts) and counts[-1] == value(after, h + "_count", service=Q,
                                                            method="Reserve")
