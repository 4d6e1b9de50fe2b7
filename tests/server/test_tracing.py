"""QUOTAGATE_TRACES=otlp on the real server: its spans exported by the real OTLP gRPC
exporter to a real (small) trace collector run here; and with traces off, nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from conftest import Grpc
from quotagate.app import App
from quotagate.server import tracing
from quotagate.settings import Settings
from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc

M = "message_tokens"
ADMIN, RUNTIME = "qg_admin_all_tracing_0f1e2d3c4b5a6978", "qg_rt_acme_tracing_7b1f0c9d2e4a"
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every span it is sent, with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], trace_pb2.Span]] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            res = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                self.spans += [(res, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[trace_pb2.Span]:
        return [s for _, s in self.spans if s.name == name]


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value"))
    return out


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    c = Collector()
    srv = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield c, port
    await srv.stop(0)


def settings(redis_server: Any, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                    sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                    metrics_listen="127.0.0.1:0", **kw)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_rpc_spans_reach_an_otlp_collector(redis_server: Any, redis: Any,
                                                 collector: tuple[Collector, int],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    got, port = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER",
                "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"name": "admin", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(),
         "role": "admin", "org": "*"},
        {"name": "rt", "sha256": hashlib.sha256(RUNTIME.encode()).hexdigest(),
         "role": "runtime", "org": "acme"}]}))
    app = await App(settings(redis_server, tmp_path, traces="otlp",
                             api_keys_file=str(keys))).start()
    assert app.tracing is not None and app.interceptors[0] is app.tracing.interceptor
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        await admin.UpsertPlan(admin_pb2.UpsertPlanRequest(name="tiny", allowances=[
            admin_pb2.Allowance(meter=M, monthly=1_000)]), metadata=bearer(ADMIN))
        await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="tiny"),
                              metadata=bearer(ADMIN))
        await admin.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
            org_id="acme", assistant_id="bot", enabled=True), metadata=bearer(ADMIN))

        def reserve(amount: int, key: str) -> quota_pb2.ReserveRequest:
            return quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="acme"), idempotency_key=key,
                charges=[common_pb2.Charge(meter=M, amount=amount)])

        ok = await quota.Reserve(reserve(600, "r1"), metadata=bearer(RUNTIME))
        assert ok.decision == common_pb2.DECISION_GRANTED
        no = await quota.Reserve(reserve(600, "r2"), metadata=bearer(RUNTIME))
        assert no.decision == common_pb2.DECISION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await quota.Reserve(reserve(0, "r3"), metadata=bearer(RUNTIME))
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as anon:
            await quota.Reserve(reserve(1, "r4"))
        assert anon.value.code() is grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), metadata=(
            ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
        watch = quota.WatchStatus(quota_pb2.WatchStatusRequest(
            org_id="acme", assistant_ids=["bot"]), metadata=bearer(RUNTIME))
        first = await watch.read()
        assert first.assistant_id == "bot" and first.active
        watch.cancel()
        await asyncio.sleep(0.2)  # the server sees the stream cut
    finally:
        await channel.close()
        await app.stop()  # flushes the span processor

    reserves = got.named("quotagate.v1.QuotaService/Reserve")
    assert len(reserves) == 4
    for s in reserves:
        a = attrs(s.attributes)
        assert s.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == (
            "grpc", "quotagate.v1.QuotaService", "Reserve")
        assert a["quotagate.org_id"] == "acme"
    by_code: dict[int, list[dict[str, Any]]] = {}
    for s in reserves:
        by_code.setdefault(attrs(s.attributes)["rpc.grpc.status_code"], []).append(
            {"attrs": attrs(s.attributes), "status": s.status})
    granted, denied = sorted(by_code[0], key=lambda x: x["attrs"]["quotagate.decision"],
                             reverse=True)
    assert granted["attrs"]["quotagate.decision"] == "granted"
    assert "quotagate.reason" not in granted["attrs"]
    assert denied["attrs"]["quotagate.decision"] == "denied"
    assert denied["attrs"]["quotagate.reason"] == "insufficient_balance"
    for ok_span in by_code[0]:  # a denial is an answer, not an error
        assert ok_span["status"].code == trace_pb2.Status.STATUS_CODE_UNSET
    (invalid,) = by_code[grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert invalid["status"].code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "amount" in invalid["status"].message
    assert "quotagate.decision" not in invalid["attrs"]
    (refused,) = by_code[grpc.StatusCode.UNAUTHENTICATED.value[0]]  # auth is inside
    assert refused["status"].code == trace_pb2.Status.STATUS_CODE_ERROR
    assert "credentials" in refused["status"].message

    (check,) = got.named("grpc.health.v1.Health/Check")
    assert check.trace_id == bytes.fromhex(TRACE_ID)
    assert check.parent_span_id == bytes.fromhex(PARENT_ID)
    assert check.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert attrs(check.attributes)["rpc.grpc.status_code"] == 0
    assert "quotagate.org_id" not in attrs(check.attributes)
    # the other calls came without a traceparent: each is a root of its own trace
    assert all(not s.parent_span_id and s.trace_id != check.trace_id for s in reserves)

    (stream,) = got.named("quotagate.v1.QuotaService/WatchStatus")
    a = attrs(stream.attributes)
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert a["quotagate.org_id"] == "acme"
    (upsert_org,) = got.named("quotagate.v1.AdminService/UpsertOrg")
    assert attrs(upsert_org.attributes)["quotagate.org_id"] == "acme"
    assert {r["service.name"] for r, _ in got.spans} == {"quotagate"}


async def test_service_name_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    assert tracing.resource().attributes["service.name"] == "quotagate"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "quota-sidecar-eu")
    assert tracing.resource().attributes["service.name"] == "quota-sidecar-eu"
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=qg-attr,team=platform")
    res = tracing.resource().attributes
    assert (res["service.name"], res["team"]) == ("qg-attr", "platform")


async def test_traces_off_installs_nothing(server: Grpc) -> None:
    app = server.app
    assert app.settings.traces == ""
    assert app.tracing is None
    assert not any(isinstance(i, tracing.TracingInterceptor) for i in app.interceptors)
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    health = health_pb2_grpc.HealthStub(server.channel)
    r = await health.Check(health_pb2.HealthCheckRequest())
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_traces_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from quotagate.errors import ConfigError
    from quotagate.settings import load_settings

    monkeypatch.setenv("QUOTAGATE_TRACES", "jaeger")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert e.value.field == "QUOTAGATE_TRACES"
    monkeypatch.setenv("QUOTAGATE_TRACES", "off")
    assert tracing.from_settings(load_settings()) is None
