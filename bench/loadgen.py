"""Load generator processes for bench/run.py.

Each process owns one asyncio loop and one gRPC channel and runs one of two modes:
- closed loop (`rate` = 0): `concurrency` callers back to back, for saturation throughput;
- open loop (`rate` > 0): requests start on a fixed schedule whatever the answers do, so
  latency is measured at a given offered load (no coordinated omission).
A request that is a Reserve+Commit counts as two RPCs; its latency is the pair's, and
each RPC's own latency (from its start) is recorded too.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

M = "message_tokens"
SCENARIOS = ("ceiling", "reserve_commit", "check", "get_balance", "envoy_rls")


@dataclass
class Job:
    port: int
    scenario: str
    seconds: float
    concurrency: int = 32
    rate: float = 0.0  # requests per second from this process; 0: closed loop
    orgs: int = 10_000
    teams: int = 2
    seats: int = 5
    seed: int = 0
    channels: int = 8  # connections from this process (callers spread over them)


def subject(rng: random.Random, job: Job) -> common_pb2.Subject:
    o = rng.randrange(job.orgs)
    t = rng.randrange(job.teams)
    s = rng.randrange(job.seats)
    return common_pb2.Subject(org_id=f"org-{o}", team_id=f"org-{o}-t{t}",
                              seat_id=f"org-{o}-t{t}-s{s}")


def make_call(job: Job, channel: grpc.aio.Channel,  # type: ignore[no-untyped-def]
              rpc_latencies: list[float], index: int = 0):
    """Returns (async fn() -> number of RPCs done); reserve_commit appends each RPC's
    latency to `rpc_latencies`."""
    rng = random.Random(job.seed * 1000 + index)
    health = health_pb2_grpc.HealthStub(channel)
    quota = quota_pb2_grpc.QuotaServiceStub(channel)
    hreq = health_pb2.HealthCheckRequest()
    counter = iter(range(10**12))
    tag = f"{job.seed}-{index}-{time.time_ns()}"

    async def ceiling() -> int:
        await health.Check(hreq)
        return 1

    async def reserve_commit() -> int:
        estimate = rng.randint(500, 4_000)  # a conversation turn: ~2,000 tokens
        t0 = time.perf_counter()
        r = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=subject(rng, job), idempotency_key=f"{tag}-{next(counter)}",
            charges=[common_pb2.Charge(meter=M, amount=estimate)]))
        t1 = time.perf_counter()
        rpc_latencies.append(t1 - t0)
        if r.reservation_id:
            used = int(estimate * rng.uniform(0.6, 1.1))
            await quota.Commit(quota_pb2.CommitRequest(
                reservation_id=r.reservation_id,
                actual=[common_pb2.Charge(meter=M, amount=max(used, 1))]))
            rpc_latencies.append(time.perf_counter() - t1)
            return 2
        return 1

    async def check() -> int:
        await quota.Check(quota_pb2.CheckRequest(subject=subject(rng, job), meter=M))
        return 1

    rls = None
    if job.scenario == "envoy_rls":
        from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc

        rls = rls_pb2_grpc.RateLimitServiceStub(channel)
        entry = ratelimit_pb2.RateLimitDescriptor.Entry

    async def envoy_rls() -> int:
        # what an Envoy in front of the AI endpoint asks: the same subject and estimate as
        # a Reserve, charged at once (one RPC, one round trip for Reserve and Commit)
        s = subject(rng, job)
        assert rls is not None
        await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(
            domain="ai", hits_addend=rng.randint(500, 4_000), descriptors=[
                ratelimit_pb2.RateLimitDescriptor(entries=[
                    entry(key="org_id", value=s.org_id), entry(key="team_id", value=s.team_id),
                    entry(key="seat_id", value=s.seat_id)])]))
        return 1

    async def get_balance() -> int:
        await quota.GetBalance(quota_pb2.GetBalanceRequest(subject=subject(rng, job),
                                                           meters=[M]))
        return 1

    return {"ceiling": ceiling, "reserve_commit": reserve_commit, "check": check,
            "get_balance": get_balance, "envoy_rls": envoy_rls}[job.scenario]


async def _run(job: Job) -> dict[str, object]:
    # Several connections, not one: the server's workers share the port (SO_REUSEPORT)
    # and the kernel hands each new connection to one of them, so with a single
    # connection per generator a whole measurement could land on one worker. A local
    # subchannel pool makes each channel its own connection.
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{job.port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, job.channels))]
    rpc_latencies: list[float] = []
    calls = [make_call(job, ch, rpc_latencies, i) for i, ch in enumerate(channels)]
    latencies: list[float] = []
    sent: list[float] = []  # open loop: each request's latency from when it was sent
    late: list[float] = []  # open loop: how late after its scheduled start it was sent
    rpcs = 0
    errors = 0
    for call in calls:  # connect and warm; a failure counts as an error, it stops nothing
        try:
            await call()
        except grpc.aio.AioRpcError:
            errors += 1
    rpc_latencies.clear()
    start = time.perf_counter()
    stop = start + job.seconds

    async def one(t_sched: float, call) -> None:  # type: ignore[no-untyped-def]
        nonlocal rpcs, errors
        t_send = time.perf_counter()
        try:
            done = await call()
            rpcs += done
        except grpc.aio.AioRpcError:
            errors += 1
        t_end = time.perf_counter()
        latencies.append(t_end - t_sched)
        sent.append(t_end - t_send)
        late.append(t_send - t_sched)

    if job.rate <= 0:
        async def worker(k: int) -> None:
            call = calls[k % len(calls)]
            while time.perf_counter() < stop:
                await one(time.perf_counter(), call)
        await asyncio.gather(*(worker(k) for k in range(job.concurrency)))
    else:
        interval = 1.0 / job.rate
        pending: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            t_sched = start + i * interval
            if t_sched >= stop:
                break
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(t_sched, calls[i % len(calls)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=30)
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    return {"rpcs": rpcs, "requests": len(latencies), "errors": errors, "elapsed": elapsed,
            "latencies": latencies, "rpc_latencies": rpc_latencies,
            "sent_latencies": sent if job.rate > 0 else [],
            "lateness": late if job.rate > 0 else []}


def run(job: Job) -> dict[str, object]:
    """Process entry point (multiprocessing): one event loop per process. Also reports
    the CPU seconds this generator spent."""
    t = time.process_time()
    try:
        import uvloop

        out: dict[str, object] = uvloop.run(_run(job))
    except ImportError:  # pragma: no cover
        out = asyncio.run(_run(job))
    out["cpu"] = time.process_time() - t
    return out
