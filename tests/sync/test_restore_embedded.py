"""`quotagate restore` on the embedded default (no QUOTAGATE_REDIS_URL): real `serve` and
`restore` processes on one data dir; the embedded Redis's files are deleted in between."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc

M = "message_tokens"


def _env(data_dir: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    e["QUOTAGATE_DATA_DIR"] = str(data_dir)
    return e


def _restore(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotagate", "restore"], env=_env(data_dir),
                          capture_output=True, text=True, timeout=120)


#: each serve's log lines, kept for the message of a failed stop
LOGS: dict[int, list[str]] = {}


def _drain(log: Any, lines: list[str]) -> None:
    """Keep reading the server's log so it never blocks on a full pipe; closed at EOF."""
    with log:
        lines.extend(log)


def _serve(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """`quotagate serve` on the embedded default and the built-in catalog (plan pro), one
    process, a quick syncer; its port."""
    e = {**_env(data_dir), "QUOTAGATE_LISTEN": "127.0.0.1:0", "QUOTAGATE_WORKERS": "1",
         "QUOTAGATE_SYNC_POLL_MS": "50"}
    proc = subprocess.Popen([sys.executable, "-m", "quotagate", "serve"], env=e, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"serving on [\d.]+:(\d+)", line)
        if m:
            LOGS[proc.pid] = []
            threading.Thread(target=_drain, args=(proc.stderr, LOGS[proc.pid]),
                             daemon=True).start()
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError("quotagate serve did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("serve did not stop within 60 s of SIGTERM; its log ends:\n"
                             + "".join(LOGS.get(proc.pid, [])[-30:])) from None
    assert code == 0, "".join(LOGS.get(proc.pid, [])[-30:])


SUBJECTS = (common_pb2.Subject(org_id="acme"),
            common_pb2.Subject(org_id="acme", team_id="red", seat_id="alice"))


def _balances(ch: grpc.Channel) -> list[Any]:
    q = quota_pb2_grpc.QuotaServiceStub(ch)
    return [q.GetBalance(quota_pb2.GetBalanceRequest(subject=s, meters=[M])).balances[0]
            for s in SUBJECTS]


def _spend(ch: grpc.Channel) -> tuple[str, int]:
    """Org, team, capped seat, a top-up, charges; one hold left open. Returns the open
    hold's id and the amount committed."""
    a, q = admin_pb2_grpc.AdminServiceStub(ch), quota_pb2_grpc.QuotaServiceStub(ch)
    a.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro"))
    a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="red", seats=1))
    a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="alice", team_id="red",
                                             limits=[admin_pb2.SeatLimit(
                                                 meter=M, monthly_limit=50_000)]))
    a.TopUp(admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=5_000, purchase_id="inv-1"))
    open_hold = q.Reserve(quota_pb2.ReserveRequest(
        subject=SUBJECTS[1], charges=[common_pb2.Charge(meter=M, amount=700)],
        idempotency_key="open", ttl_seconds=3600))
    assert open_hold.decision == common_pb2.DECISION_GRANTED
    committed = 0
    for i, amount in enumerate((1_234, 40_000, 999)):
        r = q.Reserve(quota_pb2.ReserveRequest(
            subject=SUBJECTS[i % 2], charges=[common_pb2.Charge(meter=M, amount=amount)],
            idempotency_key=f"k{i}"))
        assert r.decision == common_pb2.DECISION_GRANTED
        q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
        committed += amount
    return open_hold.reservation_id, committed


def _wait_synced(ch: grpc.Channel, committed: int) -> None:
    """Until SQL holds every commit (the snapshots go in the same transaction)."""
    a = admin_pb2_grpc.AdminServiceStub(ch)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = a.ListUsage(admin_pb2.ListUsageRequest(org_id="acme", meter=M)).rows
        if sum(r.amount for r in rows) == committed:
            return
        time.sleep(0.1)
    raise AssertionError("the ledger did not reach SQLite")


def test_restore_rebuilds_the_embedded_redis_from_sqlite(tmp_path: Path) -> None:
    data = tmp_path / "qg"
    proc, port = _serve(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            rid, committed = _spend(ch)
            before = _balances(ch)
            assert before[0].used == committed and before[0].reserved == 700
            _wait_synced(ch, committed)
            # while serve runs on the data dir, restore refuses and changes nothing
            busy = _restore(data)
            assert busy.returncode == 1, busy.stderr
            assert "is running" in busy.stderr and "stop the `quotagate serve`" in busy.stderr
            assert _balances(ch) == before
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.rmtree(data / "redis")  # the embedded Redis lost everything (AOF and all)

    done = _restore(data)
    assert done.returncode == 0, done.stderr
    assert "restored" in done.stdout and "embedded Redis" in done.stdout
    assert "1 open holds re-armed" in done.stdout
    assert list((data / "redis").glob("appendonly*")), "restore left no AOF behind"
    assert not (data / "redis" / "redis.pid").exists()  # its Redis stopped

    proc, port = _serve(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert _balances(ch) == before
            # the open hold came back: it can still be committed, once
            q = quota_pb2_grpc.QuotaServiceStub(ch)
            c = q.Commit(quota_pb2.CommitRequest(reservation_id=rid))
            assert c.state == common_pb2.HOLD_STATE_COMMITTED
            after = _balances(ch)
            assert (after[0].used, after[0].reserved) == (before[0].used + 700, 0)
            # the top-up's purchase id came back too: buying again is a no-op
            t = admin_pb2_grpc.AdminServiceStub(ch).TopUp(admin_pb2.TopUpRequest(
                org_id="acme", meter=M, amount=5_000, purchase_id="inv-1"))
            assert not t.applied
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_restore_without_sqlite_refuses_and_a_stale_pidfile_does_not_block(
        tmp_path: Path) -> None:
    data = tmp_path / "qg"
    (data / "redis").mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (data / "redis" / "redis.pid").write_text(f"{gone.pid}\n")  # a Redis that died
    done = _restore(data)  # it gets past the pidfile, to the next check
    assert done.returncode == 1
    assert "nothing to restore from" in done.stderr and "quotagate.db" in done.stderr
    assert not (data / "quotagate.db").exists()  # no empty database made up


def test_restore_after_a_killed_serve_stops_the_redis_it_left(tmp_path: Path) -> None:
    """SIGKILL leaves the serve's Redis running with no parent: restore stops it (AOF
    fsynced), runs on the data dir's own Redis and leaves the balances as they were."""
    data = tmp_path / "qg"
    proc, port = _serve(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            _, committed = _spend(ch)
            before = _balances(ch)
            _wait_synced(ch, committed)
        orphan = int((data / "redis" / "redis.pid").read_text())
        proc.kill()
        proc.wait(30)
        time.sleep(0.3)
        os.kill(orphan, 0)  # still running, no parent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = _restore(data)
    assert done.returncode == 0, done.stderr
    for _ in range(100):
        try:
            os.kill(orphan, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the orphaned Redis still runs")
    proc, port = _serve(data)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert _balances(ch) == before
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
