"""QUOTAGATE_FAIL_OPEN on the real server with a Redis the test kills: off, the runtime
calls are UNAVAILABLE at once (as before); on, Reserve, Check, Envoy's ShouldRateLimit and
the settling of fail-open reservations are answered without Redis, while GetBalance and
the settling of real holds stay UNAVAILABLE; bad input and API keys are checked as
always; and once Redis is back, holds are real again."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import T0
from grpc_api import G, ch, sub
from quotagate import telemetry
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc
from quotagate.ledger.model import Allowance
from quotagate.server import status
from quotagate.settings import Settings
from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc
from redis_server import RedisServer

M = "message_tokens"
Resp = rls_pb2.RateLimitResponse
T = TypeVar("T")
#: a generous bound: the deadline of every call is 10 s, Redis refuses at once
FAST = 3.0
RUNTIME_KEY = "qg_rt_acme_5c0ffee5c0ffee5c0ffee5c0ffee5c0f"


@dataclass
class Served:
    app: App
    own: RedisServer
    channel: grpc.aio.Channel
    q: Any
    rls: Any

    async def setup(self) -> None:
        """The plan and org (again after a Redis restart: it kept nothing)."""
        led = self.app.ledger
        assert led is not None
        await led.upsert_plan("pro", [Allowance(M, 1_000)])
        await led.upsert_org("acme", "pro")


@asynccontextmanager
async def serving(tmp_path: Path, clock: ManualClock, fail_open: bool,
                  **extra: Any) -> AsyncIterator[Served]:
    own = RedisServer().start()
    app = None
    try:
        app = await App(Settings(listen="127.0.0.1:0", redis_url=own.url, shards=64,
                                 sweep_interval_ms=600_000, grace_seconds=0,
                                 data_dir=tmp_path, metrics_listen="127.0.0.1:0",
                                 fail_open=fail_open, **extra), clock=clock).start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        s = Served(app, own, channel, quota_pb2_grpc.QuotaServiceStub(channel),
                   rls_pb2_grpc.RateLimitServiceStub(channel))
        await s.setup()
        yield s
        await channel.close()
    finally:
        if app is not None:
            await app.stop()
        own.close()


async def fast(aw: Awaitable[T]) -> T:
    """The call's answer, which came well within its deadline."""
    t0 = time.monotonic()
    try:
        return await aw
    finally:
        assert time.monotonic() - t0 < FAST


async def code_of(aw: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await fast(aw)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def violation(aw: Awaitable[Any]) -> str:
    """The field an INVALID_ARGUMENT answer names."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await fast(aw)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, e.value
    st = rpc_status.from_call(e.value)
    assert st is not None
    for d in st.details:
        bad = error_details_pb2.BadRequest()
        if d.Unpack(bad):
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


def reserve(amount: int = 100, key: str = "k", **kw: Any) -> Any:
    kw.setdefault("charges", [ch(amount)])
    return quota_pb2.ReserveRequest(subject=sub(), idempotency_key=key, **kw)


def envoy(hits: int = 10, **entries: str) -> Any:
    entries = entries or {"org_id": "acme"}
    return rls_pb2.RateLimitRequest(domain="ai", hits_addend=hits, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v)
            for k, v in entries.items()])])


def commit(rid: str, *actual: Any) -> Any:
    return quota_pb2.CommitRequest(reservation_id=rid, actual=list(actual))


def fail_open_count(method: str) -> float:
    v = telemetry.registry().get_sample_value("quotagate_fail_open_total",
                                              {"method": method})
    return v or 0.0


async def test_off_redis_gone_is_unavailable_fast(tmp_path: Path, clock: ManualClock) -> None:
    async with serving(tmp_path, clock, fail_open=False) as s:
        real = await s.q.Reserve(reserve(key="real"))
        assert real.decision == G
        s.own.stop()
        for call in (s.q.Reserve(reserve(), timeout=10),
                     s.q.Check(quota_pb2.CheckRequest(subject=sub(), meter=M), timeout=10),
                     s.q.Commit(commit(real.reservation_id), timeout=10),
                     s.q.GetBalance(quota_pb2.GetBalanceRequest(subject=sub()), timeout=10),
                     s.rls.ShouldRateLimit(envoy(), timeout=10)):
            assert await code_of(call) is grpc.StatusCode.UNAVAILABLE


async def test_on_runtime_calls_are_answered_without_redis(tmp_path: Path,
                                                           clock: ManualClock) -> None:
    async with serving(tmp_path, clock, fail_open=True) as s:
        real = await s.q.Reserve(reserve(key="real"))
        assert real.decision == G and real.reservation_id.startswith("r")
        s.own.stop()
        before = {m: fail_open_count(m) for m in ("Reserve", "Commit", "Check",
                                                  "ShouldRateLimit")}

        r = await fast(s.q.Reserve(reserve(250, ttl_seconds=60), timeout=10))
        assert r.decision == G and r.reason == common_pb2.DENY_REASON_UNSPECIFIED
        assert not r.silent
        assert r.reservation_id.startswith("open.") and r.reservation_id != real.reservation_id
        assert [(c.meter, c.amount) for c in r.granted] == [(M, 250)]
        assert r.expires_at.ToMilliseconds() == T0 + 60_000
        assert not r.balances  # there is no figure to give
        again = await fast(s.q.Reserve(reserve(250, ttl_seconds=60), timeout=10))
        assert again.reservation_id != r.reservation_id  # ids never repeat
        default_ttl = await fast(s.q.Reserve(reserve(5, key="d"), timeout=10))
        assert default_ttl.expires_at.ToMilliseconds() == T0 + 300_000
        # by action: what its price says
        priced = s.app.ledger.catalog.actions  # type: ignore[union-attr]
        action = next(iter(priced))
        by_action = await fast(s.q.Reserve(reserve(key="a", charges=[], action=action),
                                           timeout=10))
        assert by_action.decision == G
        assert [(c.meter, c.amount) for c in by_action.granted] == \
            [(c.meter, c.amount) for c in priced[action]]
        # allow_partial: all of it (nothing says less is left)
        partial = await fast(s.q.Reserve(reserve(900, key="p", allow_partial=True),
                                         timeout=10))
        assert [(c.meter, c.amount) for c in partial.granted] == [(M, 900)]

        # settling the fail-open reservation: as done, nothing held to touch
        c = await fast(s.q.Commit(commit(r.reservation_id, ch(240)), timeout=10))
        assert c.state == common_pb2.HOLD_STATE_COMMITTED
        assert [(x.meter, x.amount) for x in c.charged] == [(M, 240)] and not c.balances
        f = await fast(s.q.Refund(quota_pb2.RefundRequest(
            reservation_id=again.reservation_id, reason="cancelled"), timeout=10))
        assert f.state == common_pb2.HOLD_STATE_REFUNDED
        e = await fast(s.q.Extend(quota_pb2.ExtendRequest(
            reservation_id=default_ttl.reservation_id, additional=[ch(7)], ttl_seconds=120),
            timeout=10))
        assert e.decision == G and [(x.meter, x.amount) for x in e.granted] == [(M, 7)]
        assert e.expires_at.ToMilliseconds() == T0 + 120_000

        # a real hold is never pretended resolved
        assert await code_of(s.q.Commit(commit(real.reservation_id), timeout=10)) \
            is grpc.StatusCode.UNAVAILABLE
        assert await code_of(s.q.Refund(quota_pb2.RefundRequest(
            reservation_id=real.reservation_id), timeout=10)) is grpc.StatusCode.UNAVAILABLE
        # a look-alike of a real id is not a fail-open one either
        assert await code_of(s.q.Commit(commit("r1." + "0" * 32), timeout=10)) \
            is grpc.StatusCode.UNAVAILABLE

        chk = await fast(s.q.Check(quota_pb2.CheckRequest(subject=sub(), meter=M),
                                   timeout=10))
        assert chk.active and not chk.silent and not chk.balances
        assert await code_of(s.q.GetBalance(quota_pb2.GetBalanceRequest(
            subject=sub(), meters=[M]), timeout=10)) is grpc.StatusCode.UNAVAILABLE

        ok = await fast(s.rls.ShouldRateLimit(envoy(), timeout=10))
        assert ok.overall_code == Resp.OK and [st.code for st in ok.statuses] == [Resp.OK]
        assert not ok.statuses[0].HasField("current_limit")

        after = {m: fail_open_count(m) for m in before}
        assert after["Reserve"] - before["Reserve"] == 5
        assert after["Commit"] - before["Commit"] == 1  # not the refused real ones
        assert after["Check"] - before["Check"] == 1
        assert after["ShouldRateLimit"] - before["ShouldRateLimit"] == 1


async def test_on_bad_input_is_still_invalid_argument(tmp_path: Path,
                                                      clock: ManualClock) -> None:
    async with serving(tmp_path, clock, fail_open=True) as s:
        s.own.stop()
        q = s.q
        assert await violation(q.Reserve(reserve(0), timeout=10)) == "charges[0].amount"
        assert await violation(q.Reserve(reserve(key=""), timeout=10)) == "idempotency_key"
        assert await violation(q.Reserve(reserve(charges=[ch(5, "no_such_meter")]),
                                         timeout=10)) == "charges[0].meter"
        assert await violation(q.Reserve(reserve(ttl_seconds=86_401), timeout=10)) == \
            "ttl_seconds"
        assert await violation(q.Reserve(reserve(charges=[], action="no_such_action"),
                                         timeout=10)) == "action"
        assert await violation(q.Check(quota_pb2.CheckRequest(subject=sub(), meter="nope"),
                                       timeout=10)) == "meter"
        assert await violation(q.Check(quota_pb2.CheckRequest(subject=sub(org="")),
                                       timeout=10)) == "subject.org_id"
        assert await violation(s.rls.ShouldRateLimit(envoy(team_id="t"), timeout=10)) == \
            "descriptors[0].org_id"
        assert await violation(s.rls.ShouldRateLimit(envoy(org_id="acme", colour="red"),
                                                     timeout=10)) == \
            "descriptors[0].entries[1].key"
        open_id = (await fast(q.Reserve(reserve(), timeout=10))).reservation_id
        assert open_id.startswith("open.")
        assert await violation(q.Commit(commit(open_id, ch(-1)), timeout=10)) == \
            "actual[0].amount"
        assert await violation(q.Commit(commit(open_id, ch(1, "nope")), timeout=10)) == \
            "actual[0].meter"
        assert await violation(q.Refund(quota_pb2.RefundRequest(
            reservation_id=open_id, reason="x" * 1025), timeout=10)) == "reason"
        assert await violation(q.Extend(quota_pb2.ExtendRequest(
            reservation_id=open_id, ttl_seconds=-1), timeout=10)) == "ttl_seconds"
        assert await violation(q.Extend(quota_pb2.ExtendRequest(
            reservation_id=open_id, additional=[ch(0)]), timeout=10)) == \
            "additional[0].amount"
        # ids that only look like fail-open ones
        for bad in ("open.", "open." + "G" * 32, "open." + "0" * 33, ""):
            assert await violation(q.Commit(commit(bad), timeout=10)) == "reservation_id"


async def test_once_redis_is_back_holds_are_real_again(tmp_path: Path,
                                                       clock: ManualClock) -> None:
    async with serving(tmp_path, clock, fail_open=True) as s:
        s.own.stop()
        opened = await fast(s.q.Reserve(reserve(300), timeout=10))
        assert opened.reservation_id.startswith("open.")
        s.own.start()  # the same port, empty
        await s.setup()
        r = await s.q.Reserve(reserve(100, key="after"), timeout=10)
        assert r.decision == G and r.reservation_id.startswith("r") and r.balances
        b = (await s.q.GetBalance(quota_pb2.GetBalanceRequest(subject=sub(), meters=[M]),
                                  timeout=10)).balances[0]
        assert (b.reserved, b.used) == (100, 0)  # really held; the open grant is nowhere
        # the fail-open reservation settles as done, and changes nothing in Redis
        c = await s.q.Commit(commit(opened.reservation_id), timeout=10)
        assert c.state == common_pb2.HOLD_STATE_COMMITTED
        real = await s.q.Commit(commit(r.reservation_id, ch(80)), timeout=10)
        assert real.state == common_pb2.HOLD_STATE_COMMITTED and real.balances
        b = (await s.q.GetBalance(quota_pb2.GetBalanceRequest(subject=sub(), meters=[M]),
                                  timeout=10)).balances[0]
        assert (b.reserved, b.used, b.remaining) == (0, 80, 920)
        # and denials are real again
        d = await s.q.Reserve(reserve(5_000, key="big"), timeout=10)
        assert d.decision == common_pb2.DECISION_DENIED


async def test_fail_open_answers_are_logged_at_most_every_few_seconds(
        tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(tmp_path, clock, fail_open=True) as s:
        s.own.stop()
        monkeypatch.setattr(status.FAIL_OPEN, "_last", float("-inf"))
        monkeypatch.setattr(status.FAIL_OPEN, "_since", 0)
        caplog.set_level(logging.WARNING, logger="quotagate.server.status")
        for i in range(5):
            assert (await fast(s.q.Reserve(reserve(key=f"k{i}"), timeout=10))).decision == G
        lines = [r for r in caplog.records if r.name == "quotagate.server.status"]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert "1 call(s) answered without Redis" in lines[0].getMessage()
        assert "Reserve" in lines[0].getMessage()
        # the interval over: the next line tells how many went unlogged meanwhile
        monkeypatch.setattr(status.FAIL_OPEN, "_last", float("-inf"))
        await fast(s.rls.ShouldRateLimit(envoy(), timeout=10))
        lines = [r for r in caplog.records if r.name == "quotagate.server.status"]
        assert len(lines) == 2 and "5 call(s)" in lines[1].getMessage()
        assert "ShouldRateLimit" in lines[1].getMessage()


async def test_api_keys_still_apply(tmp_path: Path, clock: ManualClock) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "rt"\nrole = "runtime"\norg = "acme"\n'
                    f'sha256 = "{hashlib.sha256(RUNTIME_KEY.encode()).hexdigest()}"\n')
    async with serving(tmp_path, clock, fail_open=True, api_keys_file=str(keys)) as s:
        md = [("authorization", f"Bearer {RUNTIME_KEY}")]
        s.own.stop()
        assert await code_of(s.q.Reserve(reserve(), timeout=10)) is \
            grpc.StatusCode.UNAUTHENTICATED
        other = quota_pb2.ReserveRequest(subject=sub(org="beta"), idempotency_key="k",
                                         charges=[ch(1)])
        assert await code_of(s.q.Reserve(other, metadata=md, timeout=10)) is \
            grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(s.rls.ShouldRateLimit(envoy(org_id="beta"), metadata=md,
                                                    timeout=10)) is \
            grpc.StatusCode.PERMISSION_DENIED
        r = await fast(s.q.Reserve(reserve(), metadata=md, timeout=10))
        assert r.decision == G and r.reservation_id.startswith("open.")
