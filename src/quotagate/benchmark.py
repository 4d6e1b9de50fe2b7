"""`quotagate bench`: Reserve+Commit per second against the gRPC health check on the same
server, on this machine, from an installed quotagate (no repository needed).

Starts `quotagate serve` (its own embedded Redis and SQLite in a temp dir, syncer
included) as a separate process, drives it from this process with C concurrent asyncio
clients for D seconds per scenario, and prints each scenario's rate and its ratio to the
health-check ceiling measured in the same run. Nothing here asserts a time: it reports.
The repository's `make bench` is the full benchmark (bench/run.py).

    quotagate bench [--seconds 5] [--concurrency 64] [--orgs 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

M = "message_tokens"
CHANNELS = 8


def start_server(data_dir: str) -> tuple[subprocess.Popen[str], int]:
    """`quotagate serve` on the embedded default in `data_dir`, whatever QUOTAGATE_*
    this shell has (the workers setting and gRPC's I/O aside); its port."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QUOTAGATE_") or k in ("QUOTAGATE_WORKERS", "QUOTAGATE_GRPC_IO")}
    env.update(QUOTAGATE_LISTEN="127.0.0.1:0", QUOTAGATE_DATA_DIR=data_dir,
               QUOTAGATE_METRICS_LISTEN="127.0.0.1:0",
               QUOTAGATE_LOG_LEVEL="INFO")  # INFO: the "serving on" line gives the port
    proc = subprocess.Popen([sys.executable, "-m", "quotagate", "serve"], env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"serving on [\d.]+:(\d+)", line)
        if m:
            # keep reading its log, so it never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    proc.wait()
    raise SystemExit("quotagate bench: the server did not start")


async def run_for(seconds: float, concurrency: int,
                  one: Callable[[int, int], Awaitable[int]]) -> tuple[float, list[float]]:
    """Run `one(worker, i)` in `concurrency` loops for `seconds`; return ops/s, latencies."""
    stop = time.perf_counter() + seconds
    lat: list[float] = []
    count = 0

    async def worker(w: int) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            done = await one(w, i)  # not `count += await …`: that loses updates
            count += done
            lat.append(time.perf_counter() - t)
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return count / (time.perf_counter() - t0), lat


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000 if s else 0.0


async def bench(port: int, seconds: float, concurrency: int, orgs: int) -> dict[str, object]:
    # grpc loads here, not at import: `quotagate serve` must set gRPC's I/O before it does
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc

    # Several connections: the server's workers share the port and the kernel hands each
    # connection to one of them; over one connection only one worker would serve.
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                       options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(CHANNELS)]
    admin = admin_pb2_grpc.AdminServiceStub(chans[0])
    quotas = [quota_pb2_grpc.QuotaServiceStub(ch) for ch in chans]
    healths = [health_pb2_grpc.HealthStub(ch) for ch in chans]
    await admin.UpsertPlan(admin_pb2.UpsertPlanRequest(name="bench", allowances=[
        admin_pb2.Allowance(meter=M, monthly=2**49)]))
    for o in range(orgs):
        await admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id=f"org-{o}", plan="bench",
                                                         ai_enabled=True))
    hreq = health_pb2.HealthCheckRequest()

    async def health_one(w: int, i: int) -> int:
        await healths[w % CHANNELS].Check(hreq)
        return 1

    async def reserve_commit(w: int, i: int) -> int:
        quota = quotas[w % CHANNELS]
        r = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id=f"org-{(w * 7919 + i) % orgs}"),
            charges=[common_pb2.Charge(meter=M, amount=2_000)],
            idempotency_key=f"{w}-{i}"))
        await quota.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                   actual=[common_pb2.Charge(meter=M,
                                                                             amount=1_733)]))
        return 2  # two RPCs

    await run_for(1.0, concurrency, health_one)  # warm up both paths
    await run_for(1.0, concurrency, reserve_commit)
    ceiling, hl = await run_for(seconds, concurrency, health_one)
    rc, rl = await run_for(seconds, concurrency, reserve_commit)
    for ch in chans:
        await ch.close()
    return {
        "concurrency": concurrency, "seconds": seconds, "orgs": orgs,
        "health_rps": round(ceiling), "health_p50_ms": round(pct(hl, .5), 3),
        "health_p99_ms": round(pct(hl, .99), 3),
        "reserve_commit_rpc_per_s": round(rc), "reserve_commit_pairs_per_s": round(rc / 2),
        "pair_p50_ms": round(pct(rl, .5), 3), "pair_p99_ms": round(pct(rl, .99), 3),
        "ratio_to_ceiling": round(rc / ceiling, 3),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0, help="per scenario (default 5)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="callers in flight (default 64)")
    p.add_argument("--orgs", type=int, default=1000, help="orgs to spread over (default 1000)")
    p.add_argument("--json", default="", help="also write the figures to this file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quotagate bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(a: argparse.Namespace) -> int:
    for name in ("seconds", "concurrency", "orgs"):
        if getattr(a, name) <= 0:
            print(f"quotagate bench: --{name} must be positive", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="qg-bench-") as d:
        proc, port = start_server(d)
        try:
            result = asyncio.run(bench(port, a.seconds, a.concurrency, a.orgs))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{'scenario':<22}{'rate':>12}{'p50 ms':>10}{'p99 ms':>10}{'ratio':>8}")
    print(f"{'health check (ceiling)':<22}{result['health_rps']:>10}/s"
          f"{result['health_p50_ms']:>10}{result['health_p99_ms']:>10}{1.0:>8}")
    print(f"{'reserve+commit (RPCs)':<22}{result['reserve_commit_rpc_per_s']:>10}/s"
          f"{result['pair_p50_ms']:>10}{result['pair_p99_ms']:>10}"
          f"{result['ratio_to_ceiling']:>8}")
    print("(pair latency = one Reserve + one Commit; load from this one process: "
          "compare the ratio, not the absolute rates)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"report written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
