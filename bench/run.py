"""`make bench`: throughput at saturation and latency under load, as ratios to the
transport's own ceiling measured in the same run.

1. Starts a Redis of its own and `quotagate serve` on it (`--workers N` processes).
2. Seeds orgs (each with teams and seats) straight through the ledger.
   The load comes from bench/cgen/loadgen.cc (C++, gRPC C++'s completion queue on one
   thread; `make bench` builds it where gRPC C++ is installed, `make bench-deps` installs
   it) or, with --client python or where it is not built, from bench/loadgen.py
   (grpcio's asyncio client): the same scenarios and report. On a machine whose cores the
   generators share with the server, the C++ one spends about a third of the CPU per RPC
   of the Python one, so less of what is measured is the measuring.
3. For each scenario — ceiling (gRPC health Check), reserve_commit, check, get_balance —
   measures saturation throughput with closed-loop generator processes (128 callers
   each, every scenario alike; --search looks for each one's own peak instead) in 7
   rounds, each round the ceiling then the scenario back to back (the median round's
   ratio is reported: drifts of a shared machine cancel out), then p50 / p99 / p99.9
   latency with open-loop load at 25 %, 50 % and 75 % of that throughput.
   Also: reserve_commit with the pipelined spend path off (before/after), and
   reserve_commit on a 3-master Redis Cluster.
4. Floor: redis-benchmark running the reserve script itself (FCALL), no quotagate.
5. Checks the load generators are not the bottleneck: alternating rounds of the
   ceiling with one more generator process must not be meaningfully faster.
6. Prints one table, writes a JSON report and a PNG of latency against load, and says how
   much the ceiling moved over the run's rounds (max/min): above 1.5 it warns that the
   host, not quotagate, is what the run measured.
Optional: --scale (cost per Reserve at 1,000 vs 1,000,000 orgs; Redis memory per org).
Nothing here asserts a time: it measures and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's redis-server launcher
sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from quotagate.catalog import load as load_catalog  # noqa: E402
from quotagate.clock import SystemClock  # noqa: E402
from quotagate.ledger.keys import Keys, escape  # noqa: E402
from quotagate.ledger.model import Allowance  # noqa: E402
from quotagate.ledger.store import Ledger  # noqa: E402
from quotagate.settings import GRPC_POLL_EXPERIMENTS  # noqa: E402
from redis_server import RedisServer  # noqa: E402

M = "message_tokens"

#: processes whose CPU time each measurement accounts for (Linux /proc), by role
WATCH: dict[str, list[int]] = {"quotagate": [], "redis": []}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cpu_now() -> dict[str, float]:
    if WATCH["quotagate"]:  # the serve process, then its workers as they are now
        WATCH["quotagate"] = [WATCH["quotagate"][0], *_children(WATCH["quotagate"][0])]
    return {role: sum(_proc_cpu(p) for p in pids) for role, pids in WATCH.items()}


#: GRPC_EXPERIMENTS as the operator gave it (None: not set); the generators' own setting
#: (see main) is not passed on to the server, which picks its I/O by QUOTAGATE_GRPC_IO
OWN_GRPC_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS")


def start_quotagate(redis_url: str, workers: int, pipeline: bool = True,
                    grpc_io: str | None = None) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "QUOTAGATE_LISTEN": "127.0.0.1:0", "QUOTAGATE_REDIS_URL": redis_url,
           "QUOTAGATE_LOG_LEVEL": "INFO", "QUOTAGATE_SYNC_IN_PROCESS": "false",
           "QUOTAGATE_NOTIFY_IN_PROCESS": "false",
           "QUOTAGATE_REDIS_PIPELINE": "true" if pipeline else "false"}
    if OWN_GRPC_EXPERIMENTS is None:
        env.pop("GRPC_EXPERIMENTS", None)
    if grpc_io:
        env["QUOTAGATE_GRPC_IO"] = grpc_io
    cmd = [sys.executable, "-m", "quotagate", "serve"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, env=env, text=True, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"serving on [\d.]+:(\d+)", line)
        if m:
            WATCH["quotagate"] = [proc.pid]
            import threading

            # keep reading its log so it never blocks on a full pipe (stop() joins this)
            drain = threading.Thread(target=lambda: [None for _ in proc.stderr],  # type: ignore[union-attr]
                                     daemon=True)
            drain.start()
            DRAINS[proc.pid] = drain
            return proc, int(m.group(1))
    raise SystemExit("quotagate serve did not start")


async def seed(url: str, orgs: int, teams: int, seats: int) -> None:
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster as ClusterClient

        r: Any = ClusterClient.from_url("redis://" + url.split("://")[1].split(",")[0])
    else:
        r = aioredis.Redis.from_url(url, max_connections=64)
    ledger = Ledger(r, load_catalog(None).catalog, SystemClock())
    await ledger.upsert_plan("bench", [Allowance(M, 2**40)])
    sem = asyncio.Semaphore(64)

    async def one(o: int) -> None:
        async with sem:
            org = f"org-{o}"
            await ledger.upsert_org(org, "bench", seats=teams * seats)
            for t in range(teams):
                await ledger.upsert_team(org, f"{org}-t{t}", seats)
                for s in range(seats):
                    await ledger.upsert_seat(org, f"{org}-t{t}-s{s}", f"{org}-t{t}")
    await asyncio.gather(*(one(o) for o in range(orgs)))
    await ledger.aclose()
    await r.aclose()


#: ports of the Redis servers of the measured server (one, or the cluster's masters)
REDIS_PORTS: list[int] = []


def _settle_redis() -> int:
    """Before a measurement: what the syncer (off in the benchmark, see the README) would
    have done, delete the ledger entries waiting for SQL, so the streams do not grow
    through the whole run (their size is in every AOF rewrite's fork). Returns Redis's
    fork count so far (AOF rewrites)."""
    import redis as sync_redis

    forks = 0
    keys = Keys()
    for port in REDIS_PORTS:
        with sync_redis.Redis(port=port) as r:
            pipe = r.pipeline(transaction=False)
            for shard in range(keys.shards):
                pipe.xtrim(keys.ledger(shard), maxlen=0)
            try:
                pipe.execute()
            except sync_redis.exceptions.ResponseError:
                pass  # a cluster node: each shard's stream is on one of them
            forks += int(r.info("stats").get("total_forks", 0))
    return forks


#: the C++ load generator (bench/cgen/loadgen.cc), built by `make bench` where gRPC C++
#: is installed
CPP_CLIENT = ROOT / "build" / "cgen" / "loadgen"


def _run_cpp(jobs: list[loadgen.Job]) -> list[dict[str, Any]]:
    """One C++ generator process per job, all at once; each prints loadgen.run's report."""
    env = dict(os.environ)
    env.pop("GRPC_EXPERIMENTS", None)  # grpcio's experiments: gRPC C++ 1.51 has others
    procs = [subprocess.Popen(
        [str(CPP_CLIENT), "--port", str(j.port), "--scenario", j.scenario,
         "--seconds", str(j.seconds), "--concurrency", str(j.concurrency),
         "--rate", str(j.rate), "--orgs", str(j.orgs), "--teams", str(j.teams),
         "--seats", str(j.seats), "--seed", str(j.seed), "--channels", str(j.channels)],
        stdout=subprocess.PIPE, text=True, env=env) for j in jobs]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=max(j.seconds for j in jobs) + 60)
        if proc.returncode != 0:
            raise SystemExit(f"the C++ load generator failed (exit {proc.returncode})")
        out.append(json.loads(stdout))
    return out


def drive(port: int, scenario: str, seconds: float, generators: int, concurrency: int,
          rate: float, a: argparse.Namespace) -> dict[str, Any]:
    forks = _settle_redis()
    jobs = [loadgen.Job(port=port, scenario=scenario, seconds=seconds, concurrency=concurrency,
                        rate=rate / generators if rate else 0.0, orgs=a.orgs, teams=a.teams,
                        seats=a.seats, seed=i + 1, channels=a.channels)
            for i in range(generators)]
    before = _cpu_now()
    workers = WATCH["quotagate"][1:]
    w_before = [_proc_cpu(w) for w in workers]
    if a.client == "cpp":
        results = _run_cpp(jobs)
    else:
        with mp.get_context("spawn").Pool(generators) as pool:
            results = pool.map(loadgen.run, jobs)
    after = _cpu_now()
    forks = _settle_redis() - forks
    w_spent = [_proc_cpu(w) - b for w, b in zip(workers, w_before, strict=True)]
    lat = sorted(x for r in results for x in r["latencies"])  # type: ignore[attr-defined]
    rpc = sorted(x for r in results for x in r["rpc_latencies"])  # type: ignore[attr-defined]
    elapsed = max(float(r["elapsed"]) for r in results)  # type: ignore[arg-type]

    def pct(xs: list[float], p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1000, 3) if xs else 0.0

    out = {"rpc_per_s": round(sum(int(r["rpcs"]) for r in results) / elapsed),  # type: ignore[call-overload]
           "requests_per_s": round(len(lat) / elapsed),
           "errors": sum(int(r["errors"]) for r in results),  # type: ignore[call-overload]
           "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99), "p999_ms": pct(lat, 0.999)}
    rpcs = max(1, sum(int(r["rpcs"]) for r in results))  # type: ignore[call-overload]
    cpu = {role: after[role] - before[role] for role in WATCH}
    cpu["generators"] = sum(float(r["cpu"]) for r in results)  # type: ignore[arg-type, misc]
    per_rpc = {role: round(v / rpcs * 1e6, 1) for role, v in cpu.items()}
    per_rpc["total"] = round(sum(cpu.values()) / rpcs * 1e6, 1)
    result: dict[str, Any] = {**out, "cpu_us_per_rpc": per_rpc, "redis_forks": forks}
    if sum(w_spent) > 0:  # how evenly the kernel spread the connections over the workers
        result["worker_cpu_share"] = [round(x / sum(w_spent), 2) for x in w_spent]
    sent = sorted(x for r in results for x in r["sent_latencies"])  # type: ignore[attr-defined]
    late = sorted(x for r in results for x in r["lateness"])  # type: ignore[attr-defined]
    if late:  # open loop: latency from the actual send, and how late the generators sent
        result.update(sent_p50_ms=pct(sent, 0.50), sent_p99_ms=pct(sent, 0.99),
                      late_p50_ms=pct(late, 0.50), late_p99_ms=pct(late, 0.99))
    if rpc:  # reserve_commit: each RPC's own latency as well as the pair's
        result.update(rpc_p50_ms=pct(rpc, 0.50), rpc_p99_ms=pct(rpc, 0.99),
                      rpc_p999_ms=pct(rpc, 0.999))
    return result


#: pid -> the thread reading that server's log
DRAINS: dict[int, Any] = {}


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        drain = DRAINS.pop(proc.pid, None)
        if drain is not None:
            drain.join(10)
        if proc.stderr is not None:
            proc.stderr.close()


#: (port, scenario) -> callers per generator at which its throughput peaked
LEVELS: dict[tuple[int, str], int] = {}
SEARCHED: dict[tuple[int, str], dict[int, int]] = {}


def saturation_level(port: int, name: str, a: argparse.Namespace) -> int:
    """Closed-loop callers per generator for the scenario: --concurrency (128), the same
    for every scenario and the ceiling, enough in flight that none of them leaves the
    server idle (at 32, a Reserve+Commit caller, which waits for two round trips and
    Redis per request, did: the ratio measured the callers as much as the server). With
    --search: one short run at each level from 32, doubling, to --max-concurrency, and
    the fastest is used (on a shared 2-core machine the search mostly chases noise; it
    is there to check that the fixed level is not below any scenario's peak)."""
    key = (port, name)
    if not a.search:
        return a.concurrency
    if key not in LEVELS:
        tried: dict[int, int] = {}
        level = 32
        while level <= a.max_concurrency:
            tried[level] = drive(port, name, a.seconds, a.generators, level, 0, a)["rpc_per_s"]
            level *= 2
        LEVELS[key] = max(tried, key=lambda c: tried[c])
        SEARCHED[key] = tried
    return LEVELS[key]


def saturate(port: int, name: str, a: argparse.Namespace,
             latency: bool = True) -> dict[str, Any]:
    """Saturation in `a.rounds` rounds, each the ceiling (health Check on this same server)
    then the scenario back to back, each at its own saturation level: a round's ratio
    compares two measurements a few seconds apart, so slow drifts of a shared machine
    cancel out. The median round is reported. Then latency at 25/50/75 % of the median
    saturation."""
    rounds = []
    lc = saturation_level(port, "ceiling", a)
    ls = lc if name == "ceiling" else saturation_level(port, name, a)
    for _ in range(a.rounds):
        ceiling = drive(port, "ceiling", a.seconds, a.generators, lc, 0, a)
        sat = ceiling if name == "ceiling" else \
            drive(port, name, a.seconds, a.generators, ls, 0, a)
        rounds.append({"ceiling_rpc_per_s": ceiling["rpc_per_s"], **sat,
                       "ratio": round(sat["rpc_per_s"] / max(1, ceiling["rpc_per_s"]), 3),
                       "cpu_ratio": round(ceiling["cpu_us_per_rpc"]["total"]
                                          / max(1.0, sat["cpu_us_per_rpc"]["total"]), 3),
                       "ceiling_cpu_us_per_rpc": ceiling["cpu_us_per_rpc"]})
    mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    load = {str(f): drive(port, name, a.seconds, a.generators, a.concurrency,
                          mid["requests_per_s"] * f, a)
            for f in (0.25, 0.50, 0.75)} if latency else {}
    cpu_ratio = sorted(r["cpu_ratio"] for r in rounds)[len(rounds) // 2]
    return {"saturation": mid, "rounds": rounds, "ratio_to_ceiling": mid["ratio"],
            "cpu_ratio_to_ceiling": cpu_ratio, "load": load,
            "callers_per_generator": {"ceiling": lc, name: ls},
            "saturation_search": {"ceiling": SEARCHED.get((port, "ceiling")),
                                  name: SEARCHED.get((port, name))}}


#: max/min of the ceiling's rounds above which a run is reported as too noisy to read
#: (on a quiet day the 2-core machine moves about ±20 %: a spread up to 1.5)
NOISY = 1.5


def noise(report: dict[str, Any]) -> dict[str, Any]:
    """How much the ceiling (the same health check every time) moved over the run's
    rounds on the single server: a measure of the host, not of quotagate."""
    xs = [r["ceiling_rpc_per_s"] for name, sc in report["scenarios"].items()
          if name not in ("reserve_commit_cluster", "reserve_commit_event_engine")
          for r in sc.get("rounds", [])]
    if not xs or min(xs) <= 0:
        return {}
    spread = round(max(xs) / min(xs), 2)
    return {"ceiling_min": min(xs), "ceiling_max": max(xs), "spread": spread,
            "too_noisy": spread > NOISY}


def client_check(port: int, a: argparse.Namespace) -> dict[str, Any]:
    """Are the generators the limit? Alternating rounds of the ceiling with the usual
    generators and with one more process: if one more process raises the median by
    less than 10 %, the server (not the client) is the limit."""
    level = saturation_level(port, "ceiling", a)
    base, more = [], []
    for _ in range(3):
        base.append(drive(port, "ceiling", a.seconds, a.generators, level, 0, a)["rpc_per_s"])
        more.append(drive(port, "ceiling", a.seconds, a.generators + 1, level, 0,
                          a)["rpc_per_s"])
    b, m = sorted(base)[1], sorted(more)[1]
    return {"ceiling": base, "ceiling_with_one_more_generator": more,
            "median_gain": round(m / max(1, b) - 1, 3),
            "verdict": "server-bound" if m < 1.1 * b else
            "client may be limiting: add --generators"}


def floor(port: int, requests: int) -> dict[str, Any]:
    """redis-benchmark running the reserve script directly (the Function the server calls,
    FCALL): what Redis alone costs."""
    from quotagate.ledger.scripts import library

    tag, lib = library(load_catalog(None).catalog.quiet_meters)  # as the server builds it
    import redis as sync_redis

    with sync_redis.Redis(port=port) as r:
        r.execute_command("FUNCTION", "LOAD", "REPLACE", lib)
    k = Keys()
    org = "org-1"
    shard = k.shard_of(org)
    keys = [k.cfg(org), k.prefix(shard) + "idem:org-1:__rand_int__",
            k.prefix(shard) + f"h:r{shard}.__rand_int__", k.expiries(shard), k.ledger(shard),
            k.bal(org, M)]
    argv = ["__now__", "R", f"r{shard}.x__rand_int__", "300000", "0", "fp", "86400000",
            "100000", k.prefix(shard), escape(""), "", "", "", "", "{}", "1", escape(M), "c",
            "2000"]
    now = str(int(time.time() * 1000))
    argv[0] = now
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", str(requests), "-c", "32",
                          "-r", "1000000000", "--csv", "FCALL", f"qg_{tag}_reserve",
                          str(len(keys)), *keys, *argv], capture_output=True, text=True,
                         timeout=300)
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith('"FCALL')]
    if not rows:
        return {"error": (out.stdout + out.stderr)[-500:]}
    fields = [f.strip('"') for f in rows[0].split(",")]
    return {"rpc_per_s": round(float(fields[1])), "p50_ms": float(fields[4]) if len(fields) > 4
            else None, "p99_ms": float(fields[6]) if len(fields) > 6 else None}


async def org_memory(r: Any, ledger: Ledger, org: str) -> int:
    """Bytes of every key that belongs to one org (its keys contain its escaped id)."""
    k = ledger.keys
    keys = [k.cfg(org), k.purchases(org), *(k.bal(org, m) for m in ledger.catalog.meters)]
    keys += [x async for x in r.scan_iter(f"{k.org_prefix(org)}idem:{escape(org)}:*")]
    return sum([await r.memory_usage(key) or 0 for key in keys])


async def scale(url: str) -> dict[str, Any]:
    """Redis-side cost per Reserve at 1,000 and 1,000,000 orgs, and memory per org."""
    r = aioredis.Redis.from_url(url, max_connections=64)
    ledger = Ledger(r, load_catalog(None).catalog, SystemClock())
    await ledger.upsert_plan("bench", [Allowance(M, 2**40)])
    from quotagate.ledger.model import Charge, Subject

    async def settle_shards() -> None:
        """Empty every shard's expiry index and ledger stream. Their size follows the
        traffic in flight, not the number of orgs (in service Commits take holds out of
        the index and the syncer empties the streams); without this the runs at 1,000,000
        orgs met the 30,000 open holds and entries the 1,000-org runs had left, and paid
        for bigger sorted sets and streams, not for more orgs."""
        k = ledger.keys
        pipe = r.pipeline(transaction=False)
        for shard in range(k.shards):
            pipe.delete(k.expiries(shard), k.ledger(shard))
        await pipe.execute()

    async def cost(n_orgs: int) -> float:
        """Median of 3 runs of 10,000 Reserves spread over the orgs, each run from the
        same shard-level state (settle_shards)."""
        runs = []
        sem = asyncio.Semaphore(64)

        async def one(i: int, rep: int) -> None:
            async with sem:
                await ledger.reserve(Subject(f"org-{(i * 7919) % n_orgs}"),
                                     [Charge(M, 10)], idempotency_key=f"s{n_orgs}-{rep}-{i}")
        for rep in range(3):
            await settle_shards()
            await r.config_resetstat()
            await asyncio.gather(*(one(i, rep) for i in range(10_000)))
            stats = await r.info("commandstats")
            runs.append(float(stats["cmdstat_fcall"]["usec_per_call"]))
        return sorted(runs)[1]

    async def populate(start: int, stop: int) -> None:
        sem = asyncio.Semaphore(64)

        async def one(o: int) -> None:
            async with sem:
                await ledger.upsert_org(f"org-{o}", "bench")
                # touch its wallet once, as a live org's is: the measured Reserves then
                # meet existing wallets at both sizes, not first touches at one of them
                await ledger.get_balance(Subject(f"org-{o}"), [M])
        await asyncio.gather(*(one(o) for o in range(start, stop)))

    async def control(n_orgs: int) -> float:
        """The same spread of orgs read by a plain HMGET of each org's configuration: how
        Redis's own cost per command moves with the keyspace (CPU caches, hash tables)."""
        runs = []
        for _ in range(3):
            await r.config_resetstat()
            for start in range(0, 10_000, 500):
                pipe = r.pipeline(transaction=False)
                for i in range(start, start + 500):
                    pipe.hmget(ledger.keys.cfg(f"org-{(i * 7919) % n_orgs}"), "anchor", "ai")
                await pipe.execute()
            stats = await r.info("commandstats")
            runs.append(float(stats["cmdstat_hmget"]["usec_per_call"]))
        return sorted(runs)[1]

    await populate(0, 1_000)
    small = await cost(1_000)
    small_ctl = await control(1_000)
    await populate(1_000, 1_000_000)
    large = await cost(1_000_000)
    large_ctl = await control(1_000_000)
    # One org with 3 teams and 20 seats, all touched once.
    org = "memory-org"
    await ledger.upsert_org(org, "bench", seats=20)
    for t in range(3):
        await ledger.upsert_team(org, f"t{t}", 7)
    for s in range(20):
        await ledger.upsert_seat(org, f"s{s}", f"t{s % 3}")
        await ledger.reserve(Subject(org, seat_id=f"s{s}"), [Charge(M, 10)],
                             idempotency_key=f"mem{s}")
    mem = await org_memory(r, ledger, org)
    await ledger.aclose()
    await r.aclose()
    return {"usec_per_reserve_1k_orgs": small, "usec_per_reserve_1m_orgs": large,
            "ratio_1m_to_1k": round(large / small, 3),
            "plain_hmget_usec_1k_orgs": small_ctl, "plain_hmget_usec_1m_orgs": large_ctl,
            "plain_hmget_ratio_1m_to_1k": round(large_ctl / small_ctl, 3),
            "bytes_per_org_3_teams_20_seats": mem,
            "note": "Redis-side FCALL time per Reserve (commandstats, median of 3 runs of "
                    "10,000), every org's wallet touched once beforehand at both sizes, "
                    "each run from empty expiry indexes and ledger streams; "
                    "plain_hmget: the same orgs' configuration read by a bare HMGET, Redis's "
                    "own change with the keyspace; memory: MEMORY USAGE "
                    "of every key of the org (configuration, each meter's balances, purchases, "
                    "idempotency records), open holds excluded"}


def cluster_scenario(a: argparse.Namespace) -> dict[str, Any]:
    """reserve_commit on a 3-master Redis Cluster (three more redis-servers on the same
    cores): the same scripts, each org's keys on its shard's node."""
    from cluster_server import RedisCluster

    cluster = RedisCluster().start()
    WATCH["redis"] = [n.proc.pid for n in cluster.nodes if n.proc]
    REDIS_PORTS[:] = [n.port for n in cluster.nodes]
    proc = None
    try:
        url = cluster.url
        asyncio.run(seed(url, a.orgs, a.teams, a.seats))
        proc, port = start_quotagate(url, a.workers)
        out = saturate(port, "reserve_commit", a)
        print(f"  reserve_commit_cluster: {out['saturation']['rpc_per_s']} RPC/s", flush=True)
        return out
    finally:
        stop(proc)
        cluster.close()


def _marks(m: dict[str, Any]) -> str:
    """Flags of a latency measurement: * Redis forked during it (an AOF rewrite, a core
    of its own for a while), ~ the kernel's deal of connections left one worker with more
    than 60 % of the work."""
    share = m.get("worker_cpu_share") or [0.5]
    return ("*" if m.get("redis_forks") else "") + ("~" if max(share) > 0.6 else "")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, sc in report["scenarios"].items():
        if not sc["load"]:
            continue
        pts = sorted(sc["load"].items(), key=lambda kv: float(kv[0]))
        xs = [v["requests_per_s"] for _, v in pts]
        ax.plot(xs, [v["p50_ms"] for _, v in pts], marker="o", label=f"{name} p50")
        ax.plot(xs, [v["p99_ms"] for _, v in pts], marker="x", linestyle="--",
                label=f"{name} p99")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("quotagate latency against load (25/50/75 % of saturation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--client", choices=("cpp", "python"),
                   default="cpp" if CPP_CLIENT.exists() else "python",
                   help="the load generators: C++ (bench/cgen, the default where `make bench` "
                        "could build it) or Python (bench/loadgen.py, grpcio's asyncio client)")
    p.add_argument("--generators", type=int, default=None,
                   help="load generator processes (C++: 1, Python: 3; the client check "
                        "finds one more no faster)")
    p.add_argument("--concurrency", type=int, default=128,
                   help="closed-loop callers per generator, every scenario")
    p.add_argument("--search", action="store_true",
                   help="find each scenario's own saturation level instead (32, 64, … "
                        "--max-concurrency callers per generator, the fastest wins)")
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="the last level of --search")
    p.add_argument("--channels", type=int, default=None,
                   help="connections per generator (default: 32 in all, shared by the "
                        "generators). The kernel deals connections, not requests, to the "
                        "workers, at random: 8 split 6:2 or worse about a quarter of the time")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=7,
                   help="ceiling/scenario pairs per scenario (the median ratio is reported)")
    p.add_argument("--orgs", type=int, default=10_000)
    p.add_argument("--teams", type=int, default=2)
    p.add_argument("--seats", type=int, default=5)
    p.add_argument("--scenarios", default=",".join(loadgen.SCENARIOS),
                   help="comma separated, of: " + ", ".join(loadgen.SCENARIOS))
    p.add_argument("--scale", action="store_true", help="also 1,000 vs 1,000,000 orgs")
    p.add_argument("--scale-only", action="store_true", help="only the --scale measurement")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--no-compare", action="store_true",
                   help="skip reserve_commit with the pipelined spend path switched off")
    p.add_argument("--no-cluster", action="store_true",
                   help="skip reserve_commit on a 3-master Redis Cluster")
    a = p.parse_args()
    if a.generators is None:
        a.generators = 1 if a.client == "cpp" else 3
    if a.channels is None:
        a.channels = -(-32 // a.generators)
    # The generators are gRPC clients on the same cores: they use the cheaper poll-based
    # I/O too, so less of the machine goes to measuring (an explicit GRPC_EXPERIMENTS wins).
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_POLL_EXPERIMENTS)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    redis_srv = RedisServer("--appendonly", "yes", "--appendfsync", "everysec").start()
    WATCH["redis"] = [redis_srv.proc.pid] if redis_srv.proc else []
    REDIS_PORTS[:] = [redis_srv.port]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": vars(a), "scenarios": {}}
    proc = None
    if a.scale_only:
        try:
            report["scale"] = asyncio.run(scale(redis_srv.url))
        finally:
            redis_srv.close()
        print(f"scale: {report['scale']}")
        (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
        return
    try:
        t = time.perf_counter()
        asyncio.run(seed(redis_srv.url, a.orgs, a.teams, a.seats))
        report["seed_seconds"] = round(time.perf_counter() - t, 1)
        proc, port = start_quotagate(redis_srv.url, a.workers)
        for name in a.scenarios.split(","):
            report["scenarios"][name] = saturate(port, name, a)
            sc = report["scenarios"][name]
            print(f"  {name}: {sc['saturation']['rpc_per_s']} RPC/s at "
                  f"{sc['callers_per_generator'][name]} callers per generator "
                  f"(search: {sc['saturation_search'][name]})",
                  flush=True)
        report["client_check"] = client_check(port, a)
        stop(proc)
        proc = None
        if not a.no_compare:
            # Before/after of the pipelined spend path: the same server with it switched off.
            proc, port = start_quotagate(redis_srv.url, a.workers, pipeline=False)
            sc = saturate(port, "reserve_commit", a, latency=False)
            sc["note"] = "QUOTAGATE_REDIS_PIPELINE=false: each script through redis-py's pool"
            report["scenarios"]["reserve_commit_unpipelined"] = sc
            print(f"  reserve_commit_unpipelined: {sc['saturation']['rpc_per_s']} RPC/s",
                  flush=True)
            stop(proc)
            proc = None
            # Before/after of the poll-based gRPC I/O: the same server on gRPC's EventEngine
            # thread pool (its ceiling is measured on it too, in the same rounds).
            proc, port = start_quotagate(redis_srv.url, a.workers, grpc_io="event_engine")
            sc = saturate(port, "reserve_commit", a)
            sc["note"] = "QUOTAGATE_GRPC_IO=event_engine: gRPC's own I/O thread pool"
            report["scenarios"]["reserve_commit_event_engine"] = sc
            print(f"  reserve_commit_event_engine: {sc['saturation']['rpc_per_s']} RPC/s "
                  f"(its ceiling {sc['saturation']['ceiling_rpc_per_s']})", flush=True)
            stop(proc)
            proc = None
        report["floor"] = floor(redis_srv.port, 50_000)
        if a.scale:
            report["scale"] = asyncio.run(scale(redis_srv.url))
    finally:
        stop(proc)
        redis_srv.close()
    if not a.no_cluster:
        report["scenarios"]["reserve_commit_cluster"] = cluster_scenario(a)
    report["noise"] = noise(report)
    ceiling = report["scenarios"].get("ceiling", {}).get("saturation", {}).get("rpc_per_s")
    print(f"\n{'scenario':<28}{'RPC/s':>9}{'ratio':>7}{'CPU us':>8}{'ratio':>7}{'callers':>8}"
          "   p50/p99/p99.9 ms at 25% | 50% | 75%")
    for name, sc in report["scenarios"].items():
        rate = sc["saturation"]["rpc_per_s"]
        ratio = sc["ratio_to_ceiling"]
        cpu = sc["saturation"]["cpu_us_per_rpc"]["total"]
        callers = sc.get("callers_per_generator", {}).get(name, "")
        lat = " | ".join(f"{v['p50_ms']}/{v['p99_ms']}/{v['p999_ms']}{_marks(v)}"
                         for v in sc["load"].values()) or sc.get("note", "")
        print(f"{name:<28}{rate:>9}{ratio:>7.2f}{cpu:>8.0f}{sc['cpu_ratio_to_ceiling']:>7.2f}"
              f"{callers:>8}   {lat}")
        if any("late_p99_ms" in v for v in sc["load"].values()):
            per = " | ".join(f"{v['sent_p50_ms']}/{v['sent_p99_ms']} late {v['late_p99_ms']}"
                             for v in sc["load"].values())
            print(f"{'  (from the send; lateness)':<44}   {per}")
        if any("rpc_p50_ms" in v for v in sc["load"].values()):
            per = " | ".join(f"{v['rpc_p50_ms']}/{v['rpc_p99_ms']}/{v['rpc_p999_ms']}"
                             for v in sc["load"].values())
            print(f"{'  (each RPC alone)':<44}   {per}")
    print("(ratio: RPC/s over the ceiling's, median of the rounds; CPU us: CPU time of "
          "quotagate, Redis and the generators per RPC at saturation, and the ceiling's CPU "
          "per RPC over it: the same comparison, less moved by a busy host; callers: "
          "closed-loop callers per generator at which the scenario peaked; from the send: "
          "p50/p99 from when the generator actually sent, and p99 of how late after its "
          "scheduled start it sent: latencies are from the scheduled start, so a late "
          "generator counts against the server; * Redis forked (an AOF rewrite) during "
          "that measurement; ~ one worker did more than 60 % of its work)")
    for name, sc in report["scenarios"].items():
        c = sc["saturation"]["cpu_us_per_rpc"]
        print(f"  {name}: CPU us per RPC " + ", ".join(f"{k} {v:.0f}" for k, v in c.items()))
    fl = report["floor"]
    if "rpc_per_s" in fl and ceiling:
        print(f"{'floor (redis)':<28}{fl['rpc_per_s']:>9}{fl['rpc_per_s'] / ceiling:>7.2f}"
              "   redis-benchmark FCALL of the reserve script")
    ee = report["scenarios"].get("reserve_commit_event_engine")
    rc = report["scenarios"].get("reserve_commit")
    if ee and rc:
        print(f"gRPC I/O: poll (default) ceiling {rc['saturation']['ceiling_rpc_per_s']}, "
              f"reserve_commit {rc['saturation']['rpc_per_s']} RPC/s; event_engine ceiling "
              f"{ee['saturation']['ceiling_rpc_per_s']}, reserve_commit "
              f"{ee['saturation']['rpc_per_s']} RPC/s")
    rls = report["scenarios"].get("envoy_rls")
    if rls and rc:  # per AI response: one ShouldRateLimit, or a Reserve and a Commit
        pairs = rc["saturation"]["requests_per_s"]
        print(f"AI responses charged a second: envoy_rls {rls['saturation']['rpc_per_s']} "
              f"(one ShouldRateLimit each), reserve_commit {pairs} (a Reserve and a Commit "
              f"each); CPU us per response {rls['saturation']['cpu_us_per_rpc']['total']:.0f}"
              f" against {2 * rc['saturation']['cpu_us_per_rpc']['total']:.0f}")
    print(f"client check: {report['client_check']}")
    nz = report["noise"]
    if nz:
        print(f"noise: the ceiling ran at {nz['ceiling_min']}-{nz['ceiling_max']} RPC/s over "
              f"this run's rounds (max/min {nz['spread']})")
        if nz["too_noisy"]:
            print(f"WARNING: the machine's speed moved more than {NOISY}x during the run: its "
                  "ratios and latencies measure the host, not quotagate. Run again when it "
                  "is quieter.")
    if "scale" in report:
        print(f"scale: {report['scale']}")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "latency.png")
    print(f"wrote {out / 'report.json'} and {out / 'latency.png'}")


if __name__ == "__main__":
    main()
