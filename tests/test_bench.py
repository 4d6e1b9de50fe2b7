"""`make bench`'s harness, small: every scenario against a real `quotagate serve` on a
Redis of its own, from the Python load generator and, where `make bench` could build it,
the C++ one. Nothing here times anything; it checks that the load is what the report
says it is: no errors, two RPCs per Reserve+Commit, every hold taken also committed, an
open loop sending at the rate asked."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from quotagate.ledger.keys import Keys
from redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import loadgen  # noqa: E402  (bench/loadgen.py)
import run  # noqa: E402  (bench/run.py)

ORGS, TEAMS, SEATS = 20, 2, 3


@pytest.fixture(scope="module")
def bench_server() -> Iterator[tuple[int, RedisServer]]:
    srv = RedisServer().start()
    run.REDIS_PORTS[:] = [srv.port]
    asyncio.run(run.seed(srv.url, ORGS, TEAMS, SEATS))
    proc, port = run.start_quotagate(srv.url, 1)
    try:
        yield port, srv
    finally:
        run.stop(proc)
        srv.close()


@pytest.fixture(scope="module")
def cpp_client() -> bool:
    """Build the C++ generator as `make bench` does, where gRPC C++ is installed."""
    if not run.CPP_CLIENT.exists() and shutil.which("grpc_cpp_plugin") and \
            subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode == 0:
        subprocess.run(["make", "--no-print-directory", "-C", str(ROOT),
                        str(run.CPP_CLIENT.relative_to(ROOT))], check=True,
                       stdout=subprocess.DEVNULL)
    return run.CPP_CLIENT.exists()


def _args(client: str, cpp: bool) -> argparse.Namespace:
    if client == "cpp" and not cpp:
        pytest.skip("no gRPC C++ here to build the C++ load generator with "
                    "(`make bench-deps` installs it)")
    return argparse.Namespace(orgs=ORGS, teams=TEAMS, seats=SEATS, channels=2, client=client)


def _open_holds(srv: RedisServer) -> int:
    keys = Keys()
    with redis.Redis(port=srv.port) as r:
        pipe = r.pipeline(transaction=False)
        for shard in range(keys.shards):
            pipe.zcard(keys.expiries(shard))
        return sum(pipe.execute())


@pytest.mark.parametrize("client", ["python", "cpp"])
@pytest.mark.parametrize("scenario", loadgen.SCENARIOS)
def test_closed_loop_counts_what_it_sends(bench_server: tuple[int, RedisServer],
                                          cpp_client: bool, client: str,
                                          scenario: str) -> None:
    port, srv = bench_server
    out = run.drive(port, scenario, 0.5, 1, 4, 0, _args(client, cpp_client))
    assert out["errors"] == 0
    assert out["requests_per_s"] > 0
    if scenario == "reserve_commit":
        # every Reserve was granted (the plan is 2^40 tokens) and then committed
        assert out["rpc_per_s"] == pytest.approx(2 * out["requests_per_s"], abs=2)
        assert out["rpc_p50_ms"] <= out["p50_ms"]  # one RPC of the pair, not the pair
        assert _open_holds(srv) == 0
    else:
        assert out["rpc_per_s"] == out["requests_per_s"]
    assert out["cpu_us_per_rpc"]["generators"] > 0


@pytest.mark.parametrize("client", ["python", "cpp"])
def test_open_loop_sends_at_the_rate_asked(bench_server: tuple[int, RedisServer],
                                           cpp_client: bool, client: str) -> None:
    port, srv = bench_server
    out = run.drive(port, "reserve_commit", 1.0, 1, 4, 60, _args(client, cpp_client))
    assert out["errors"] == 0
    assert 55 <= out["requests_per_s"] <= 65  # 60 a second, each started on schedule
    # latency from the scheduled start includes how late the send was; from the send not
    assert out["sent_p50_ms"] <= out["p50_ms"]
    assert out["late_p99_ms"] >= 0
    assert _open_holds(srv) == 0


@pytest.mark.parametrize("client", ["python", "cpp"])
def test_envoy_rls_scenario_leaves_no_hold(bench_server: tuple[int, RedisServer],
                                           cpp_client: bool, client: str) -> None:
    """envoy_rls: one ShouldRateLimit per request, each Reserve committed in the same
    step, so no hold is left open."""
    port, srv = bench_server
    out = run.drive(port, "envoy_rls", 0.5, 1, 4, 0, _args(client, cpp_client))
    assert out["errors"] == 0 and out["requests_per_s"] > 0
    assert out["rpc_per_s"] == out["requests_per_s"]
    assert _open_holds(srv) == 0
