"""`quotagate serve` flags: one for each variable of DESIGN's "Running it" table, and a
flag given wins over its variable, in the workers of `--workers N` too."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from quotagate.cli import _parser, export_flags
from quotagate.settings import load_settings
from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc
from redis_server import free_port

#: DESIGN §4 "Running it": the variables `serve` reads, each also a flag
DESIGN_VARIABLES = ("QUOTAGATE_LISTEN", "QUOTAGATE_REDIS_URL", "QUOTAGATE_DATABASE_URL",
                    "QUOTAGATE_DATA_DIR", "QUOTAGATE_CATALOG", "QUOTAGATE_METRICS_LISTEN")


def _serve_parser() -> object:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sub.choices["serve"]  # type: ignore[attr-defined]


def test_every_documented_variable_is_a_serve_flag() -> None:
    options = {o for a in _serve_parser()._actions for o in a.option_strings}  # type: ignore[attr-defined]
    for var in DESIGN_VARIABLES:
        flag = "--" + var.removeprefix("QUOTAGATE_").lower().replace("_", "-")
        assert flag in options, f"serve has no {flag} for {var}"


def test_flags_parse_and_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAGATE_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("QUOTAGATE_METRICS_LISTEN", "127.0.0.1:1111")
    args = _parser().parse_args(["serve", "--database-url", "sqlite:///from-flag.db",
                                 "--metrics-listen", "127.0.0.1:2222"])
    assert (args.database_url, args.metrics_listen) == ("sqlite:///from-flag.db",
                                                        "127.0.0.1:2222")
    s = load_settings(database_url=args.database_url, metrics_listen=args.metrics_listen)
    assert (s.database_url, s.metrics_listen) == ("sqlite:///from-flag.db", "127.0.0.1:2222")
    env = {"QUOTAGATE_METRICS_LISTEN": "127.0.0.1:1111", "QUOTAGATE_CATALOG": "keep.toml"}
    export_flags({"metrics_listen": "127.0.0.1:2222", "catalog": None}, env)
    assert env == {"QUOTAGATE_METRICS_LISTEN": "127.0.0.1:2222",
                   "QUOTAGATE_CATALOG": "keep.toml"}


def test_bad_flag_value_is_a_configuration_error_naming_the_variable(tmp_path: Path) -> None:
    e = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    done = subprocess.run([sys.executable, "-m", "quotagate", "serve", "--data-dir",
                           str(tmp_path), "--metrics-listen", "nowhere"],
                          env=e, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "QUOTAGATE_METRICS_LISTEN" in done.stderr
    assert not (tmp_path / "redis").exists()  # refused before anything started


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return str(r.read().decode())


def test_serve_with_metrics_and_database_flags(tmp_path: Path) -> None:
    """The flags beat the variables: /metrics on the flag's port, the ledger copied to
    the flag's SQLite file; the variables' port and file stay unused."""
    env_port, flag_port = free_port(), free_port()
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"
    e = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    e.update({"QUOTAGATE_METRICS_LISTEN": f"127.0.0.1:{env_port}",
              "QUOTAGATE_DATABASE_URL": f"sqlite:///{env_db}",
              "QUOTAGATE_SYNC_POLL_MS": "50"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotagate", "serve", "--workers", "2",
         "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
         "--metrics-listen", f"127.0.0.1:{flag_port}", "--database-url", f"sqlite:///{flag_db}"],
        env=e, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    drain = None
    try:
        port = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not port:
            line = proc.stderr.readline()
            m = re.search(r"serving on [\d.]+:(\d+)", line)
            if m:
                port = int(m.group(1))
            elif not line and proc.poll() is not None:
                break
        assert port, "quotagate serve did not start"
        drain = threading.Thread(target=proc.stderr.read, daemon=True)
        drain.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            admin_pb2_grpc.AdminServiceStub(ch).UpsertOrg(admin_pb2.UpsertOrgRequest(
                org_id="acme", plan="pro"))
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            r = q.Reserve(quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="acme"), action="ai_sequence",
                idempotency_key="k1"))
            assert r.decision == common_pb2.DECISION_GRANTED
            q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))

        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                body = _scrape(flag_port)
                if "quotagate_rpc_requests_total" in body:
                    break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        assert "quotagate_rpc_requests_total" in body
        with pytest.raises((urllib.error.URLError, OSError)):
            _scrape(env_port)

        rows = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and rows < 2:  # the reserve and the commit
            if flag_db.exists():
                with sqlite3.connect(flag_db) as db:
                    try:
                        rows = db.execute("SELECT COUNT(*) FROM ledger_entries").fetchone()[0]
                    except sqlite3.OperationalError:  # not migrated yet
                        pass
            time.sleep(0.1)
        assert rows >= 2
        assert not env_db.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            drain.join(10)
        proc.stderr.close()


def test_fail_open_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--fail-open` switches QUOTAGATE_FAIL_OPEN on; without it the variable decides."""
    monkeypatch.delenv("QUOTAGATE_FAIL_OPEN", raising=False)
    args = _parser().parse_args(["serve"])
    assert args.fail_open is None and load_settings(fail_open=args.fail_open).fail_open is False
    args = _parser().parse_args(["serve", "--fail-open"])
    assert load_settings(fail_open=args.fail_open).fail_open is True
    env: dict[str, str] = {}
    export_flags({"fail_open": args.fail_open}, env)
    assert env == {"QUOTAGATE_FAIL_OPEN": "true"}  # the workers of --workers N get it too


def test_quotagate_bench_reports_a_ratio(tmp_path: Path) -> None:
    """`quotagate bench` (an installed quotagate, no repository): a server of its own on a
    temp embedded Redis, whatever QUOTAGATE_* the shell has; it reports, never asserts."""
    import json

    report = tmp_path / "r.json"
    e = {**os.environ, "QUOTAGATE_REDIS_URL": "redis://127.0.0.1:1/0",  # ignored
         "QUOTAGATE_METRICS_LISTEN": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "quotagate", "bench", "--seconds", "0.3",
                           "--orgs", "3", "--concurrency", "4", "--json", str(report)],
                          env=e, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "health check (ceiling)" in done.stdout and "reserve+commit" in done.stdout
    r = json.loads(report.read_text())
    assert r["health_rps"] > 0 and r["reserve_commit_rpc_per_s"] > 0
    assert abs(r["ratio_to_ceiling"] - r["reserve_commit_rpc_per_s"] / r["health_rps"]) < 0.01
    bad = subprocess.run([sys.executable, "-m", "quotagate", "bench", "--seconds", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--seconds" in bad.stderr
