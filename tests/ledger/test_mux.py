"""The spend path's pipelined connection (ledger/mux.py) on real Redis servers: concurrent
requests share writes, a silent or lost Redis is answered fast with UNAVAILABLE and costs
nothing twice, and the connection follows the URL's password and database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tls_files import tls_files

from conftest import CLUSTER
from quotagate import catalog
from quotagate.clock import ManualClock
from quotagate.errors import Unavailable
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.store import Ledger, LedgerOptions
from redis_server import RedisServer

pytestmark = pytest.mark.skipif(
    CLUSTER, reason="single servers of its own (the cluster form: test_cluster_routing.py)")

M = "message_tokens"


async def open_ledger(url: str, clock: ManualClock, timeout_s: float = 0.3,
                      pipeline: bool = True) -> tuple[Any, Ledger]:
    r = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)
    led = Ledger(r, catalog.load(None).catalog, clock, Keys(8),
                 LedgerOptions(pipeline=pipeline))
    await led.upsert_plan("p", [Allowance(M, 1_000_000)])
    await led.upsert_org("o", "p")
    return r, led


async def used(led: Ledger) -> tuple[int, int]:
    (b,) = await led.get_balance(Subject("o"), [M])
    return b.used, b.reserved


async def test_concurrent_requests_share_round_trips(redis_server: Any, redis: Any,
                                                     clock: ManualClock) -> None:
    r, led = await open_ledger(redis_server.url, clock)
    assert led.mux is not None
    # Scripts not in Redis: the 50 requests that find the Function library missing
    # together load it once between them.
    await r.script_flush()
    await r.function_flush()
    await r.config_resetstat()
    first = await asyncio.gather(*(led.reserve(Subject("o"), [Charge(M, 10)],
                                               idempotency_key=f"f{i}") for i in range(50)))
    assert all(x.decision is Decision.GRANTED for x in first)
    stats = await r.info("commandstats")
    assert stats["cmdstat_function|load"]["calls"] == 1
    assert stats["cmdstat_fcall"]["calls"] == 100  # each: "Function not found", the run
    for x in first:
        await led.refund(x.reservation_id)
    before = (await r.info("stats"))["total_reads_processed"]
    n = 200
    res = await asyncio.gather(*(led.reserve(Subject("o"), [Charge(M, 10)],
                                             idempotency_key=f"k{i}") for i in range(n)))
    assert all(x.decision is Decision.GRANTED for x in res)
    assert len({x.reservation_id for x in res}) == n
    reads = (await r.info("stats"))["total_reads_processed"] - before
    # 200 scripts arrived in far fewer socket reads than one each: they were pipelined.
    assert reads < n / 4, reads
    await asyncio.gather(*(led.commit(x.reservation_id) for x in res))
    assert await used(led) == (10 * n, 0)
    await led.aclose()
    await r.aclose()


async def test_unpipelined_path_gives_the_same_answers(redis_server: Any, redis: Any,
                                                       clock: ManualClock) -> None:
    r, led = await open_ledger(redis_server.url, clock, pipeline=False)
    assert led.mux is None
    res = await asyncio.gather(*(led.reserve(Subject("o"), [Charge(M, 10)],
                                             idempotency_key=f"u{i}") for i in range(50)))
    await asyncio.gather(*(led.commit(x.reservation_id, [Charge(M, 7)]) for x in res))
    assert await used(led) == (350, 0)
    await r.aclose()


async def test_silent_redis_is_unavailable_fast_and_retry_charges_once(
        clock: ManualClock) -> None:
    srv = RedisServer().start()
    try:
        r, led = await open_ledger(srv.url, clock, timeout_s=0.3)
        other = aioredis.Redis.from_url(srv.url)
        await other.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        t = time.monotonic()
        with pytest.raises(Unavailable):
            await led.reserve(Subject("o"), [Charge(M, 40)], idempotency_key="once")
        assert time.monotonic() - t < 1.2  # the timeout (0.3 s), not the pause
        await asyncio.sleep(1.6)  # the pause ends; the timed-out script may have run
        again = await led.reserve(Subject("o"), [Charge(M, 40)], idempotency_key="once")
        assert again.decision is Decision.GRANTED
        assert await used(led) == (0, 40)  # one hold, whether the first one ran or not
        await led.commit(again.reservation_id)
        assert await used(led) == (40, 0)
        await led.aclose()
        await other.aclose()
        await r.aclose()
    finally:
        srv.close()


async def test_restarted_redis_reconnects_and_reloads_scripts(clock: ManualClock) -> None:
    srv = RedisServer().start()
    try:
        r, led = await open_ledger(srv.url, clock)
        first = await led.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="a")
        srv.stop()
        t = time.monotonic()
        with pytest.raises(Unavailable):
            await led.commit(first.reservation_id)
        with pytest.raises(Unavailable):  # no server: the connect fails, fast
            await led.commit(first.reservation_id)
        assert time.monotonic() - t < 2
        srv.start()  # empty: no data, no scripts
        for _ in range(3):  # redis-py's pooled connections may be stale once
            try:
                await led.upsert_plan("p", [Allowance(M, 1_000_000)])
                break
            except Unavailable:
                pass
        await led.upsert_plan("p", [Allowance(M, 1_000_000)])
        await led.upsert_org("o", "p")
        res = await led.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="b")
        assert res.decision is Decision.GRANTED
        await led.commit(res.reservation_id)
        assert await used(led) == (5, 0)
        await led.aclose()
        await r.aclose()
    finally:
        srv.close()


async def test_password_and_database_of_the_url(clock: ManualClock) -> None:
    srv = RedisServer("--requirepass", "s3cret").start()
    try:
        base = f"redis://:s3cret@127.0.0.1:{srv.port}"
        r, led = await open_ledger(f"{base}/3", clock)
        res = await led.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="a")
        assert res.decision is Decision.GRANTED
        db3 = aioredis.Redis.from_url(f"{base}/3")
        db0 = aioredis.Redis.from_url(f"{base}/0")
        assert await db3.exists(led.keys.hold(res.reservation_id)) == 1
        assert await db0.dbsize() == 0
        bad = aioredis.Redis.from_url(f"redis://:nope@127.0.0.1:{srv.port}/3")
        wrong = Ledger(bad, catalog.load(None).catalog, clock, Keys(8))
        with pytest.raises(Unavailable):
            await wrong.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="b")
        for c in (db3, db0, r, bad):
            await c.aclose()
        await led.aclose()
        await wrong.aclose()
    finally:
        srv.close()


async def test_commands_carry_any_bytes(redis_server: Any, redis: Any) -> None:
    from quotagate.ledger.mux import Mux

    mux = Mux.for_client(redis, 1.0)
    assert mux is not None
    values = ["plain", "", "ünïcødé ✓", "a\r\nb", 12345, -7, b"\x00\xff raw"]
    for i, v in enumerate(values):
        assert await mux.execute("SET", f"mux:{i}", v) == b"OK"
    for i, v in enumerate(values):
        want = v if isinstance(v, bytes) else str(v).encode()
        assert await redis.get(f"mux:{i}") == want
    await mux.aclose()


@pytest.mark.parametrize("args", [
    ("FCALL", "qg_x_reserve", 2, "qg:{7}:org:o", "qg:{7}:bal:o:m", 1763919238123, "R", ""),
    ("SET", "k", "ünïcødé ✓", -7, b"\x00\xff raw", "a\r\nb", 0, 2**50),
])
def test_the_c_packer_writes_what_the_python_one_writes(args: tuple[Any, ...]) -> None:
    """The spend path packs with hiredis where it can: byte for byte the same commands
    as the Python packer (the fallback), for text, non-ASCII text, bytes and integers."""
    from quotagate.ledger import mux

    assert mux.pack(args) == mux.pack_py(args) == mux.pack_py(list(args))
    assert mux.pack(args).startswith(b"*%d\r\n" % len(args))


async def test_tls_redis_is_pipelined_too(clock: ManualClock, tmp_path: Path) -> None:
    """`rediss://`: the spend path's connection speaks TLS with the settings redis-py
    takes from the URL (here its CA), concurrent calls still share writes, and a server
    whose certificate the CA did not sign is UNAVAILABLE, not trusted."""
    from redis_server import free_port

    ca, cert, key = tls_files(tmp_path)
    tls_port = free_port()
    try:
        srv = RedisServer("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                          "--tls-auth-clients", "no").start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    try:
        r, led = await open_ledger(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}", clock)
        assert led.mux is not None and led.mux.tls is not None
        plain = aioredis.Redis.from_url(srv.url)
        before = (await plain.info("stats"))["total_reads_processed"]
        n = 200
        res = await asyncio.gather(*(led.reserve(Subject("o"), [Charge(M, 1)],
                                                 idempotency_key=f"t{i}") for i in range(n)))
        assert all(x.decision is Decision.GRANTED for x in res)
        reads = (await plain.info("stats"))["total_reads_processed"] - before
        assert reads < n / 4, reads
        # another CA: the certificate is refused, the call fails fast, nothing is held
        (tmp_path / "other").mkdir()
        other, _, _ = tls_files(tmp_path / "other")
        bad = aioredis.Redis.from_url(
            f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={other}", socket_timeout=1)
        wrong = Ledger(bad, catalog.load(None).catalog, clock, Keys(8))
        with pytest.raises(Unavailable):
            await wrong.reserve(Subject("o"), [Charge(M, 5)], idempotency_key="x")
        assert await used(led) == (0, n)
        for c in (plain, bad, r):
            await c.aclose()
        await led.aclose()
        await wrong.aclose()
    finally:
        srv.close()
