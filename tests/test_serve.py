"""`quotagate serve` as an operator runs it: a real process, the embedded Redis, health,
reflection, SIGTERM draining, and configuration errors that name the variable."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import Grpc
from quotagate.settings import GRPC_POLL_EXPERIMENTS
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def _drain(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stderr is not None
    with proc.stderr:
        lines.extend(proc.stderr)


def start_serve(tmp_path: Path, drop: tuple[str, ...] = (), lines: list[str] | None = None,
                **env: str) -> tuple[subprocess.Popen[str], int]:
    """`quotagate serve` on a free port; its log after the start goes to `lines`."""
    e = dict(os.environ)
    for name in ("QUOTAGATE_REDIS_URL", *drop):  # the embedded Redis unless `env` names one
        e.pop(name, None)
    e.update({"QUOTAGATE_LISTEN": "127.0.0.1:0", "QUOTAGATE_DATA_DIR": str(tmp_path),
              "QUOTAGATE_CATALOG": str(ROOT / "examples" / "catalog.toml"), **env})
    proc = subprocess.Popen([sys.executable, "-m", "quotagate", "serve"], env=e, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"serving on [\d.]+:(\d+)", line)
        if m:
            # Keep reading the log so the server never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc, [] if lines is None else lines),
                             daemon=True).start()
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError("quotagate serve did not start")


def own_channels(port: int, n: int) -> list[grpc.Channel]:
    """`n` channels to the server, each its own connection (the kernel deals connections
    to the workers, not calls)."""
    return [grpc.insecure_channel(f"127.0.0.1:{port}",
                                  options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(n)]


def close_and_stop(channels: list[grpc.Channel], proc: subprocess.Popen[str]) -> None:
    for ch in channels:
        ch.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_serve_embedded_health_reflection_and_sigterm(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(
                service="quotagate.v1.QuotaService")).status == \
                health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            answer = next(iter(refl.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]))))
            names = {s.name for s in answer.list_services_response.service}
            assert {"quotagate.v1.QuotaService", "quotagate.v1.AdminService",
                    "envoy.service.ratelimit.v3.RateLimitService",
                    "grpc.health.v1.Health"} <= names
            # The demo org of the example catalog answers right away.
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            r = q.Reserve(quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                charges=[common_pb2.Charge(meter="message_tokens", amount=2_000)],
                idempotency_key="serve-test"))
            assert r.decision == common_pb2.DECISION_GRANTED
            c = q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
            assert c.state == common_pb2.HOLD_STATE_COMMITTED
        redis_pid = int((tmp_path / "redis" / "redis.pid").read_text()) \
            if (tmp_path / "redis" / "redis.pid").exists() else None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # AOF lives in the data directory, and the embedded Redis stopped with the sidecar.
    assert list((tmp_path / "redis").glob("appendonly*")), "no AOF written"
    if redis_pid:
        with pytest.raises(ProcessLookupError):
            os.kill(redis_pid, 0)
    # Restarting on the same data directory keeps what was committed.
    proc, port = start_serve(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            b = quota_pb2_grpc.QuotaServiceStub(ch).GetBalance(quota_pb2.GetBalanceRequest(
                subject=common_pb2.Subject(org_id="demo"), meters=["message_tokens"]))
            assert b.balances[0].used == 2_000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _redis_on(data_dir: Path) -> list[int]:
    """Pids of the redis-servers whose socket is in `data_dir`."""
    sock = str(data_dir / "redis" / "redis.sock").encode()
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"redis-server" in cmd and sock in cmd:
                found.append(int(p.name))
    return found


def _used(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        b = quota_pb2_grpc.QuotaServiceStub(ch).GetBalance(quota_pb2.GetBalanceRequest(
            subject=common_pb2.Subject(org_id="demo"), meters=["message_tokens"]))
        return b.balances[0].used


def test_one_embedded_redis_per_data_dir(tmp_path: Path) -> None:
    """A second serve on a data dir in use is refused (two Redis on one AOF would corrupt
    it) and the first goes on; after the first is killed (SIGKILL: its Redis lives on,
    orphaned), the next serve stops that Redis and takes over, with the data."""
    first, port = start_serve(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            r = q.Reserve(quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                charges=[common_pb2.Charge(meter="message_tokens", amount=1_234)],
                idempotency_key="lock-test"))
            q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
        assert len(_redis_on(tmp_path)) == 1
        e = {k: v for k, v in os.environ.items() if k != "QUOTAGATE_REDIS_URL"}
        e.update(QUOTAGATE_LISTEN="127.0.0.1:0", QUOTAGATE_DATA_DIR=str(tmp_path),
                 QUOTAGATE_METRICS_LISTEN="127.0.0.1:0")
        second = subprocess.run([sys.executable, "-m", "quotagate", "serve"], env=e,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "is in use" in second.stderr and "QUOTAGATE_DATA_DIR" in second.stderr
        assert len(_redis_on(tmp_path)) == 1
        assert _used(port) == 1_234  # the first serve and its Redis are untouched
        orphan = _redis_on(tmp_path)[0]
        first.kill()
        first.wait(30)
        time.sleep(0.5)
        assert _redis_on(tmp_path) == [orphan]  # the killed serve's Redis runs on
        lines: list[str] = []
        third, port = start_serve(tmp_path, lines=lines)
        try:
            assert orphan not in _redis_on(tmp_path) and len(_redis_on(tmp_path)) == 1
            assert _used(port) == 1_234
        finally:
            third.send_signal(signal.SIGTERM)
            assert third.wait(30) == 0
        assert _redis_on(tmp_path) == []
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_embedded_redis_killed_is_started_again_with_its_data(tmp_path: Path,
                                                              workers: str) -> None:
    """The embedded Redis dies under a running serve (the OOM killer, a crash): serve
    starts it again from its AOF, on the same socket, and calls work again. A hold made
    before (and fsynced: `everysec`) is still there and commits once."""
    lines: list[str] = []
    proc, port = start_serve(tmp_path, lines=lines, QUOTAGATE_WORKERS=workers)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            reserve = quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                charges=[common_pb2.Charge(meter="message_tokens", amount=1_500)],
                idempotency_key="before-the-kill")
            held = q.Reserve(reserve)
            assert held.decision == common_pb2.DECISION_GRANTED
            time.sleep(1.5)  # fsynced (appendfsync everysec)
            (first,) = _redis_on(tmp_path)
            os.kill(first, signal.SIGKILL)
            deadline, answers = time.monotonic() + 60, []
            while time.monotonic() < deadline:
                try:
                    again = q.Reserve(reserve, timeout=2)  # the same key: the same hold
                    break
                except grpc.RpcError as e:
                    answers.append(e.code())
                    time.sleep(0.2)
            else:
                raise AssertionError(f"no answer after the kill: {answers[-3:]}\n"
                                     + "".join(lines[-30:]))
            assert set(answers) <= {grpc.StatusCode.UNAVAILABLE}, answers
            assert again.reservation_id == held.reservation_id
            (second,) = _redis_on(tmp_path)
            assert second != first
            c = q.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id))
            assert c.state == common_pb2.HOLD_STATE_COMMITTED
            b = q.GetBalance(quota_pb2.GetBalanceRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                meters=["message_tokens"]))
            assert (b.balances[0].used, b.balances[0].reserved) == (1_500, 0)
        assert any("starting it again" in ln for ln in lines), "".join(lines[-30:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _redis_on(tmp_path) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


_SUBREAPER_SCENARIO = r"""
import ctypes, os, re, signal, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
def serve():
    p = subprocess.Popen([sys.executable, "-m", "quotagate", "serve"], text=True,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    for line in p.stderr:
        if re.search(r"serving on", line):
            return p
    raise SystemExit("serve did not start: " + str(p.wait()))
first = serve()
redis_pid = int(open(os.environ["QUOTAGATE_DATA_DIR"] + "/redis/redis.pid").read())
first.kill(); first.wait()
time.sleep(0.3)
ppid = int(open(f"/proc/{redis_pid}/stat").read().rsplit(")", 1)[1].split()[1])
print("orphan's parent is us:", ppid == os.getpid())
second = serve()  # takes over: the orphan's starter is gone, whoever adopted it
time.sleep(0.2)
print("orphan stopped:", not os.path.exists(f"/proc/{redis_pid}") or
      open(f"/proc/{redis_pid}/stat").read().split()[2] == "Z")
second.send_signal(signal.SIGTERM)
print("second stopped:", second.wait(30))
for _ in range(50):  # reap what we adopted
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
"""


def test_a_killed_serve_is_taken_over_under_a_subreaper(tmp_path: Path) -> None:
    """Where a subreaper (systemd, tini -s, a supervisor) adopts the Redis a killed serve
    left, its parent is not 1: the next serve still takes over, since it asks whether
    the serve that started that Redis is alive, not who its parent is."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    e.update(QUOTAGATE_LISTEN="127.0.0.1:0", QUOTAGATE_DATA_DIR=str(tmp_path),
             QUOTAGATE_METRICS_LISTEN="127.0.0.1:0", QUOTAGATE_WORKERS="1")
    done = subprocess.run([sys.executable, "-c", _SUBREAPER_SCENARIO], env=e,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["orphan's parent is us: True", "orphan stopped: True",
                                        "second stopped: 0"], done.stdout


def test_a_redis_an_earlier_build_left_without_the_lock_is_stopped_first(
        tmp_path: Path) -> None:
    """Builds before the data-dir lock left their Redis running unlocked when killed: a
    serve finds it by its pidfile, stops it (AOF fsynced) and starts its own on the same
    files, with the data."""
    from quotagate.embedded import EmbeddedRedis, redis_binary

    first, port = start_serve(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            r = q.Reserve(quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                charges=[common_pb2.Charge(meter="message_tokens", amount=777)],
                idempotency_key="old-build"))
            q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    emb = EmbeddedRedis(tmp_path)  # its Redis, as an earlier build started it: no lock
    assert emb.socket is not None
    old = subprocess.Popen([redis_binary(), "--dir", str(emb.dir), "--appendonly", "yes",
                            "--save", "", "--port", "0", "--unixsocket", str(emb.socket),
                            "--pidfile", str(emb.dir / "redis.pid")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        for _ in range(200):
            if emb._ping() and (emb.dir / "redis.pid").exists():
                break
            time.sleep(0.02)
        proc, port = start_serve(tmp_path)
        try:
            assert old.wait(30) == 0  # stopped by SIGTERM, cleanly
            assert _redis_on(tmp_path) != [old.pid] and len(_redis_on(tmp_path)) == 1
            assert _used(port) == 777
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()


@pytest.mark.parametrize(("var", "value"), [("QUOTAGATE_SHARDS", "many"),
                                            ("QUOTAGATE_LISTEN", "nowhere"),
                                            ("QUOTAGATE_REDIS_URL", "http://x"),
                                            ("QUOTAGATE_DEFAULT_TTL_SECONDS", "0"),
                                            ("QUOTAGATE_GRPC_IO", "threads")])
def test_bad_setting_names_the_variable(var: str, value: str) -> None:
    out = subprocess.run([sys.executable, "-m", "quotagate", "serve"], capture_output=True,
                         text=True, env={**os.environ, var: value}, timeout=60)
    assert out.returncode == 2
    assert var in out.stderr


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("io", "own", "expected"), [
    ("poll", None, GRPC_POLL_EXPERIMENTS),
    ("event_engine", None, None),
    ("poll", "-event_engine_client", "-event_engine_client")])
def test_grpc_io_reaches_every_worker_and_an_explicit_setting_wins(
        tmp_path: Path, io: str, own: str | None, expected: str | None) -> None:
    """QUOTAGATE_GRPC_IO picks gRPC core's I/O for every worker (gRPC reads
    GRPC_EXPERIMENTS when it loads, so each worker must be started with it); an operator's
    own GRPC_EXPERIMENTS is passed on untouched. Either way the sidecar serves."""
    env = {"QUOTAGATE_GRPC_IO": io, "QUOTAGATE_WORKERS": "2"}
    if own:
        env["GRPC_EXPERIMENTS"] = own
    proc, port = start_serve(tmp_path, drop=() if own else ("GRPC_EXPERIMENTS",), **env)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(c) for c in children
                   if "serve" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")
                   and "redis" not in Path(f"/proc/{c}/comm").read_text()]
        assert len(workers) == 2
        assert {_environ(w).get("GRPC_EXPERIMENTS") for w in workers} == {expected}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            r = q.Reserve(quota_pb2.ReserveRequest(
                subject=common_pb2.Subject(org_id="demo", seat_id="alice"),
                charges=[common_pb2.Charge(meter="message_tokens", amount=10)],
                idempotency_key=f"io-{io}-{own}"))
            assert r.decision == common_pb2.DECISION_GRANTED
            assert q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id)).state \
                == common_pb2.HOLD_STATE_COMMITTED
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_bad_catalog_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[meters.a]\nkind = "sometimes"\n')
    out = subprocess.run([sys.executable, "-m", "quotagate", "serve"], capture_output=True,
                         text=True, env={**os.environ, "QUOTAGATE_CATALOG": str(bad)},
                         timeout=60)
    assert out.returncode == 2 and "meters.a.kind" in out.stderr


async def test_draining_reports_not_serving_while_rpcs_finish(server: Grpc) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
        health_pb2.HealthCheckResponse.SERVING
    await server.app.health.drain()  # type: ignore[union-attr]  # what SIGTERM does first
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    # The health loop does not flip it back while draining.
    assert not await server.app.health.update()  # type: ignore[union-attr]


async def test_health_not_serving_when_redis_is_gone() -> None:
    from quotagate.app import App
    from quotagate.settings import Settings
    from redis_server import RedisServer

    srv = RedisServer().start()
    app = await App(Settings(listen="127.0.0.1:0", redis_url=srv.url, grace_seconds=0,
                             redis_timeout_ms=200)).start()
    try:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        health = health_pb2_grpc.HealthStub(ch)
        assert await app.health.update()  # type: ignore[union-attr]
        srv.stop()
        assert not await app.health.update()  # type: ignore[union-attr]
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        # A runtime call is answered fast with UNAVAILABLE, not hung.
        t = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await quota_pb2_grpc.QuotaServiceStub(ch).Check(quota_pb2.CheckRequest(
                subject=common_pb2.Subject(org_id="o")))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t < 5  # generous bound: the point is "not hung"
        srv.start()
        assert await app.health.update()  # type: ignore[union-attr]
        await ch.close()
    finally:
        await app.stop()
        srv.close()


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, QUOTAGATE_WORKERS="2")
    try:
        deadline = time.monotonic() + 20
        children: list[int] = []
        while time.monotonic() < deadline:
            children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                        and _ppid(int(p.name)) == proc.pid and _is_serve(int(p.name))]
            if len(children) == 2:
                break
            time.sleep(0.1)
        assert len(children) == 2, children
        # Both workers accept on the same port: many fresh connections all get answers.
        for i in range(20):
            with grpc.insecure_channel(f"127.0.0.1:{port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                r = quota_pb2_grpc.QuotaServiceStub(ch).Reserve(quota_pb2.ReserveRequest(
                    subject=common_pb2.Subject(org_id="demo"), idempotency_key=f"w{i}",
                    charges=[common_pb2.Charge(meter="message_tokens", amount=1)]))
                assert r.decision == common_pb2.DECISION_GRANTED
        # A killed worker is replaced.
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and _ppid(int(p.name)) == proc.pid and _is_serve(int(p.name))]
            if len(now) == 2 and children[0] not in now:
                break
            time.sleep(0.1)
        assert len(now) == 2 and children[0] not in now
        redis_pid = int((tmp_path / "redis" / "redis.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in [*now, redis_pid]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _is_serve(pid: int) -> bool:
    try:
        return b"quotagate\x00serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_serve_freezes_its_startup_heap_out_of_the_collector(tmp_path: Path) -> None:
    """Each worker, once serving, moves what it built at startup out of the garbage
    collector's reach (app.settle_heap), so full collections under load stay short."""
    lines: list[str] = []
    proc, port = start_serve(tmp_path, lines=lines, QUOTAGATE_LOG_LEVEL="DEBUG")
    try:
        deadline = time.monotonic() + 10
        frozen = None
        while frozen is None and time.monotonic() < deadline:
            for line in list(lines):
                m = re.search(r"(\d+) objects of the started server frozen", line)
                if m:
                    frozen = int(m.group(1))
            time.sleep(0.05)
        assert frozen is not None, "no freeze logged"
        assert frozen > 10_000  # the modules, descriptors and server, not a handful
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # and it still serves
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _client_ports(server_port: int) -> set[int]:
    """Local ports of the established TCP connections to `server_port` (this network
    namespace's, so the server's own accepted ends, whose remote port is a client's,
    are not among them)."""
    ports = set()
    for table in ("tcp", "tcp6"):  # gRPC's sockets are dual-stack: v4 shows up in tcp6
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("grace", ["0", "0.5"])
def test_old_connections_are_renewed_and_no_call_fails(tmp_path: Path, grace: str) -> None:
    """The kernel deals connections, not calls, over the workers, once: connections past
    QUOTAGATE_MAX_CONNECTION_AGE_SECONDS are asked to reconnect (and so dealt again) while
    every call keeps succeeding. A stream open on an old connection lives on (grace 0) or
    ends when the grace is up."""
    proc, port = start_serve(tmp_path, QUOTAGATE_WORKERS="2",
                             QUOTAGATE_MAX_CONNECTION_AGE_SECONDS="1",
                             QUOTAGATE_MAX_CONNECTION_AGE_GRACE_SECONDS=grace)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            watch = q.WatchStatus(quota_pb2.WatchStatusRequest(org_id="demo"))
            assert next(watch).assistant_id == "helpdesk-bot"
            ports: set[int] = set()
            calls = 0
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                r = q.Reserve(quota_pb2.ReserveRequest(
                    subject=common_pb2.Subject(org_id="demo"), idempotency_key=f"age{calls}",
                    charges=[common_pb2.Charge(meter="message_tokens", amount=1)]))
                assert r.decision == common_pb2.DECISION_GRANTED
                calls += 1
                ports |= _client_ports(port)
                time.sleep(0.01)
            assert calls > 50
            assert len(ports) >= 3, ports  # a new connection each second or so
            if grace == "0":
                assert watch.is_active()
                watch.cancel()
            else:
                with pytest.raises(grpc.RpcError) as e:
                    next(watch)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _serve_children(parent: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and _ppid(int(p.name)) == parent and _is_serve(int(p.name))]


def _connections_by_worker(workers: list[int], server_port: int,
                           state: str = "01") -> dict[int, int]:
    """How many established client connections (state "0A": listening sockets) each
    worker process holds."""
    inodes: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == state and int(f[1].rsplit(":", 1)[1], 16) == server_port:
                inodes[f[9]] = 0
    held = dict.fromkeys(workers, 0)
    for pid in workers:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        held[pid] += 1
    return held


def test_connections_spread_again_after_a_worker_restarts(tmp_path: Path) -> None:
    """A killed worker's clients reconnect to the survivor before its replacement
    listens; with connections renewed (here every second) the replacement gets its share
    back instead of staying idle for as long as those connections last."""
    proc, port = start_serve(tmp_path, QUOTAGATE_WORKERS="2",
                             QUOTAGATE_MAX_CONNECTION_AGE_SECONDS="1")
    channels = own_channels(port, 16)
    try:
        stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]

        def call_all() -> None:
            for s in stubs:
                for attempt in range(3):  # a call sent on a killed worker's socket fails
                    try:
                        s.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True,
                                timeout=10)
                        break
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                            raise

        deadline = time.monotonic() + 20
        while len(first := _serve_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        call_all()
        os.kill(first[0], signal.SIGKILL)
        survivor = first[1]
        call_all()  # every client is on the survivor now, the replacement not yet up
        held = _connections_by_worker([survivor], port)
        # (a connection being renewed, every second here, is briefly not counted; and
        # once the replacement is up the renewals start moving connections to it)
        if held[survivor] != 16 and len(_serve_children(proc.pid)) == 1:
            call_all()
            held = _connections_by_worker([survivor], port)
        if len(_serve_children(proc.pid)) == 1:
            assert held[survivor] == 16, held
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = _serve_children(proc.pid)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.1)
        replacement = next(p for p in now if p != survivor)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            call_all()
            held = _connections_by_worker([survivor, replacement], port)
            if held[replacement] >= 3:
                break
            time.sleep(0.05)
        assert held[replacement] >= 3, held
    finally:
        close_and_stop(channels, proc)


def _worker_index(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in env
                if e.startswith(b"QUOTAGATE_WORKER_INDEX="))


def _reserves_counted(metrics_port: int) -> float:
    import urllib.request

    time.sleep(0.3)  # a call is counted just after it is answered

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    return sum(s.value for fam in text_string_to_metric_families(text.decode())
               for s in fam.samples if s.name == "quotagate_rpc_requests_total"
               and s.labels["method"] == "Reserve" and s.labels["code"] == "OK")


def test_metrics_add_up_every_worker_and_survive_a_restart(tmp_path: Path) -> None:
    """One /metrics for the whole server: worker 0 serves it and adds up every worker's
    counters; a worker killed and restarted goes on from its count."""
    from redis_server import free_port

    metrics = free_port()
    proc, port = start_serve(tmp_path, QUOTAGATE_WORKERS="2",
                             QUOTAGATE_METRICS_LISTEN=f"127.0.0.1:{metrics}")
    channels = own_channels(port, 16)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # both workers listening
            workers = _serve_children(proc.pid)
            if len(workers) == 2 and \
                    min(_connections_by_worker(workers, port, "0A").values()) > 0:
                break
            time.sleep(0.1)
        n = 0

        def reserve_on_every_channel() -> None:
            nonlocal n
            for c in channels:
                n += 1
                r = quota_pb2_grpc.QuotaServiceStub(c).Reserve(quota_pb2.ReserveRequest(
                    subject=common_pb2.Subject(org_id="demo"), idempotency_key=f"m{n}",
                    charges=[common_pb2.Charge(meter="message_tokens", amount=1)]),
                    wait_for_ready=True, timeout=10)
                assert r.decision == common_pb2.DECISION_GRANTED

        reserve_on_every_channel()
        reserve_on_every_channel()
        # both workers served some (16 connections: all on one worker is 1 in 32,768)
        assert min(_connections_by_worker(workers, port).values()) > 0
        assert _reserves_counted(metrics) == 32
        one = next(p for p in workers if _worker_index(p) == "1")
        os.kill(one, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = _serve_children(proc.pid)
            if len(now) == 2 and one not in now:
                break
            time.sleep(0.1)
        assert _reserves_counted(metrics) == 32  # the killed worker's count is kept
        for c in channels:  # connections to the killed worker are gone: new ones
            c.close()
        channels[:] = own_channels(port, 16)
        reserve_on_every_channel()
        assert _reserves_counted(metrics) == 48
    finally:
        close_and_stop(channels, proc)


def test_the_quickstart_example_against_serve(tmp_path: Path) -> None:
    """README's quick start: examples/quickstart.py against `serve` with the demo org."""
    _quickstart([sys.executable, str(ROOT / "examples" / "quickstart.py")], tmp_path)


def _quickstart(command: list[str], tmp_path: Path) -> None:
    """A quick start example against `serve` and the demo org: it prints what README
    shows."""
    proc, port = start_serve(tmp_path)
    try:
        out = subprocess.run([*command, f"127.0.0.1:{port}"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "committed 1733 tokens; meter [1,733/3,000,000 used]"
    finally:
        close_and_stop([], proc)


def test_a_node_runtime_reserves_and_commits(tmp_path: Path) -> None:
    """Any language works: examples/node/quickstart.mjs (@grpc/grpc-js, the .proto files
    loaded as they are) against `serve`, as README says."""
    import shutil

    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("CI"):
            raise AssertionError("node and npm are needed for the Node.js example")
        pytest.skip("no node/npm here")
    example = ROOT / "examples" / "node"
    if not (example / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=example,
                       check=True, timeout=300)
    _quickstart([node, str(example / "quickstart.mjs")], tmp_path)


def test_the_admin_command_calls_any_method_with_json(tmp_path: Path) -> None:
    import json

    proc, port = start_serve(tmp_path)

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quotagate", "admin", *args,
                               "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=60)

    try:
        listed = admin("list")
        assert listed.returncode == 0 and "TopUp" in listed.stdout and \
            "GetBalance" in listed.stdout
        top = admin("TopUp", json.dumps({"org_id": "demo", "meter": "message_tokens",
                                         "amount": 5000, "purchase_id": "cli-1"}))
        assert top.returncode == 0, top.stderr
        assert json.loads(top.stdout)["applied"] is True
        bal = admin("GetBalance", json.dumps({"subject": {"org_id": "demo"},
                                              "meters": ["message_tokens"]}))
        assert bal.returncode == 0, bal.stderr
        [b] = json.loads(bal.stdout)["balances"]
        assert int(b["topupRemaining"]) == 1_005_000  # the demo's welcome top-up + 5,000
        bad = admin("TopUp", json.dumps({"org_id": "demo", "meter": "message_tokens",
                                         "amount": 0, "purchase_id": "cli-2"}))
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        assert admin("TopUp", "{not json").returncode == 2
        assert admin("NoSuchMethod").returncode == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
