"""A review of API keys, roles and org scopes (DESIGN §6) on the real server with real
Redis, over plaintext loopback (test_auth.py runs the same rules over mTLS; what it
checks is not repeated here): every AdminService RPC against another org, the
indirect ways to reach another org (a hold after it expired, Envoy descriptors), the
role of each key, the keys file (duplicates, types, reload, removal), the bearer
header, the loopback rule, what is open without a key, and requests that do not
decode."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import Grpc, stop_or_report
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc
from quotagate.errors import ConfigError
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.server import auth as auth_mod
from quotagate.server.auth import KeyRing, load_keys
from quotagate.settings import Settings
from quotagate.v1 import admin_pb2, admin_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc
from redis_server import RedisServer

M = "message_tokens"
KEYS = {
    "rt_acme": "qg_review_rt_acme_3f9a1c0e7b5d4a2c9e8f7a6b5c4d3e2f",
    "rt_all": "qg_review_rt_all_0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "admin_acme": "qg_review_admin_acme_55aa66bb77cc88dd99ee00ff1122",
    "admin_all": "qg_review_admin_all_c0ffeec0ffeec0ffeec0ffeec0ffee",
    "lead_acme_sales": "qg_review_lead_sales_a5a5a5a5b6b6b6b6c7c7c7c7d8d8",
}
ENTRIES = {
    "rt_acme": ("runtime", "acme", ""),
    "rt_all": ("runtime", "*", ""),
    "admin_acme": ("admin", "acme", ""),
    "admin_all": ("admin", "*", ""),
    "lead_acme_sales": ("team_lead", "acme", "sales"),
}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_toml(entries: dict[str, tuple[str, str, str]]) -> str:
    out = []
    for name, (role, org, team) in entries.items():
        out.append(f'[[keys]]\nname = "{name}"\nsha256 = "{sha(KEYS[name])}"\n'
                   f'role = "{role}"\norg = "{org}"\n' + (f'team = "{team}"\n' if team else ""))
    return "\n".join(out)


def md(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[name]}")]


async def code_of(aw: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await aw
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@dataclass
class Served:
    app: App
    channel: grpc.aio.Channel
    quota: Any
    admin: Any
    rls: Any
    keys_path: Path

    @property
    def ledger(self) -> Any:
        assert self.app.ledger is not None
        return self.app.ledger


@pytest.fixture
async def served(redis_server: RedisServer, redis: Any, clock: ManualClock,
                 tmp_path: Path) -> AsyncIterator[Served]:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(ENTRIES))
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(path)),
                    clock=clock).start()
    led = app.ledger
    assert led is not None
    await led.upsert_plan("pro", [Allowance(M, 1_000_000)])
    for org in ("acme", "beta"):
        await led.upsert_org(org, "pro", seats=5)
        await led.upsert_team(org, "sales")
        await led.upsert_seat(org, "bob", "sales")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Served(app, channel, quota_pb2_grpc.QuotaServiceStub(channel),
                 admin_pb2_grpc.AdminServiceStub(channel),
                 rls_pb2_grpc.RateLimitServiceStub(channel), path)
    await channel.close()
    await stop_or_report(app)


def admin_calls(org: str) -> dict[str, Any]:
    """One request of every AdminService RPC that names an org, for `org`."""
    a = admin_pb2
    return {
        "UpsertOrg": a.UpsertOrgRequest(org_id=org, plan="pro", seats=9),
        "UpsertTeam": a.UpsertTeamRequest(org_id=org, team_id="sales", seats=3),
        "UpsertSeat": a.UpsertSeatRequest(org_id=org, seat_id="bob", team_id="sales",
                                          limits=[a.SeatLimit(meter=M, monthly_limit=1)]),
        "UpsertAssistant": a.UpsertAssistantRequest(org_id=org, assistant_id="bot",
                                                    enabled=False),
        "SetFeature": a.SetFeatureRequest(org_id=org, feature="spark", enabled=False),
        "SetAllocationTemplate": a.SetAllocationTemplateRequest(
            org_id=org, meter=M, mode=a.ALLOCATION_MODE_EVEN),
        "SetOverage": a.SetOverageRequest(org_id=org, meter=M, cap=10**9),
        "SetAutoTopUp": a.SetAutoTopUpRequest(org_id=org, meter=M, threshold=10, amount=10,
                                              enabled=True),
        "TopUp": a.TopUpRequest(org_id=org, meter=M, amount=10**6, purchase_id="steal"),
        "Transfer": a.TransferRequest(org_id=org, meter=M, to_team_id="sales", amount=5,
                                      bucket=a.BUCKET_MONTHLY, idempotency_key="t"),
        "Adjust": a.AdjustRequest(org_id=org, meter=M, delta=-999_999, reason="x",
                                  idempotency_key="a"),
        "ListUsage": a.ListUsageRequest(org_id=org),
    }


async def beta_state(s: Served) -> Any:
    b = (await s.ledger.get_balance(Subject("beta"), [M]))[0]
    cfg = await s.app.redis.hgetall(s.ledger.keys.cfg("beta"))  # type: ignore[union-attr]
    return b, cfg


# -- roles and scopes over every RPC -----------------------------------------------------
async def test_no_admin_rpc_reaches_another_org(served: Served) -> None:
    """An admin of acme, a runtime key of every org and a team lead of acme: no
    AdminService call on beta gets through, and beta is left exactly as it was."""
    before = await beta_state(served)
    for name, req in admin_calls("beta").items():
        for key in ("admin_acme", "rt_acme", "rt_all", "lead_acme_sales"):
            got = await code_of(getattr(served.admin, name)(req, metadata=md(key)))
            assert got is grpc.StatusCode.PERMISSION_DENIED, (name, key, got)
        events = served.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="beta"),
                                          metadata=md("admin_acme"))
        assert await code_of(events.read()) is grpc.StatusCode.PERMISSION_DENIED
    assert await beta_state(served) == before


async def test_runtime_keys_call_no_admin_rpc_of_their_own_org(served: Served) -> None:
    """Runtime keys (scoped, and scoped to "*") and team leads (but for UpsertSeat of
    their team): PERMISSION_DENIED on every AdminService RPC of their own org."""
    plan = admin_pb2.UpsertPlanRequest(name="free-for-all", allowances=[
        admin_pb2.Allowance(meter=M, monthly=10**12)])
    for key in ("rt_acme", "rt_all", "lead_acme_sales", "admin_acme"):
        assert await code_of(served.admin.UpsertPlan(plan, metadata=md(key))) is \
            grpc.StatusCode.PERMISSION_DENIED, key
    for name, req in admin_calls("acme").items():
        for key in ("rt_acme", "rt_all") + (() if name == "UpsertSeat" else
                                            ("lead_acme_sales",)):
            got = await code_of(getattr(served.admin, name)(req, metadata=md(key)))
            assert got is grpc.StatusCode.PERMISSION_DENIED, (name, key, got)
    for key in ("rt_acme", "rt_all", "lead_acme_sales"):
        events = served.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"),
                                          metadata=md(key))
        assert await code_of(events.read()) is grpc.StatusCode.PERMISSION_DENIED
    assert await served.app.redis.exists(  # type: ignore[union-attr]
        served.ledger.keys.plan("free-for-all")) == 0
    # what each may do, for contrast
    assert await code_of(served.admin.UpsertPlan(plan, metadata=md("admin_all"))) is \
        grpc.StatusCode.OK
    assert await code_of(served.admin.TopUp(admin_calls("acme")["TopUp"],
                                            metadata=md("admin_acme"))) is grpc.StatusCode.OK


async def test_list_usage_needs_an_org_whatever_the_key(served: Served) -> None:
    for key in ("admin_acme", "admin_all"):
        assert await code_of(served.admin.ListUsage(admin_pb2.ListUsageRequest(),
                                                    metadata=md(key))) is \
            grpc.StatusCode.INVALID_ARGUMENT, key
    assert await code_of(served.admin.ListUsage(admin_pb2.ListUsageRequest(org_id="*"),
                                                metadata=md("admin_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED


async def test_an_expired_or_settled_hold_of_another_org_stays_out_of_reach(
        served: Served, clock: ManualClock) -> None:
    """A late Commit still records usage (DESIGN §3): the hold's org is still checked
    once the sweeper expired it, and after it was committed (a Refund would credit)."""
    led = served.ledger
    expired = await led.reserve(Subject("beta"), [Charge(M, 10)], idempotency_key="e",
                                ttl_seconds=1)
    committed = await led.reserve(Subject("beta"), [Charge(M, 10)], idempotency_key="c")
    await led.commit(committed.reservation_id)
    clock.advance(5_000)
    await led.sweep_all()
    for rid in (expired.reservation_id, committed.reservation_id):
        for call in (served.quota.Commit(quota_pb2.CommitRequest(
                reservation_id=rid, actual=[common_pb2.Charge(meter=M, amount=500)]),
                metadata=md("rt_acme")),
                served.quota.Refund(quota_pb2.RefundRequest(reservation_id=rid),
                                    metadata=md("rt_acme")),
                served.quota.Extend(quota_pb2.ExtendRequest(reservation_id=rid),
                                    metadata=md("admin_acme"))):
            assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    assert (await led.get_balance(Subject("beta"), [M]))[0].used == 10


async def test_envoy_descriptor_cannot_name_a_second_org(served: Served) -> None:
    """Two org_id entries in one descriptor (own org first): refused, nothing charged."""
    req = rls_pb2.RateLimitRequest(domain="ai", hits_addend=7, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="acme"),
            ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="beta")])])
    assert await code_of(served.rls.ShouldRateLimit(req, metadata=md("rt_acme"))) in (
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    for org in ("acme", "beta"):
        assert (await served.ledger.get_balance(Subject(org), [M]))[0].used == 0


# -- requests that do not decode ------------------------------------------------------------
async def test_a_request_that_does_not_decode_is_invalid_argument_for_every_key(
        served: Served) -> None:
    """Bytes that are no request message are INVALID_ARGUMENT (decoding.py) for a key of
    one org as for a key of every org, not UNKNOWN from inside the auth check; without
    a key still UNAUTHENTICATED, and a runtime key on an admin RPC PERMISSION_DENIED."""
    garbage = b"\x0a\xff\xff"  # field 1, length-delimited, a truncated length
    methods = ["/quotagate.v1.QuotaService/Commit", "/quotagate.v1.QuotaService/Reserve",
               "/quotagate.v1.AdminService/TopUp", "/quotagate.v1.AdminService/UpsertSeat",
               "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"]
    for method in methods:
        call = served.channel.unary_unary(method)
        keys = ["rt_acme", "admin_acme", "admin_all"] + \
            (["lead_acme_sales"] if "UpsertSeat" in method else [])
        for key in keys:
            if "Admin" in method and key == "rt_acme":
                continue
            got = await code_of(call(garbage, metadata=md(key)))
            assert got is grpc.StatusCode.INVALID_ARGUMENT, (method, key, got)
        assert await code_of(call(garbage)) is grpc.StatusCode.UNAUTHENTICATED
    admin_call = served.channel.unary_unary("/quotagate.v1.AdminService/TopUp")
    assert await code_of(admin_call(garbage, metadata=md("rt_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED


# -- the bearer header ----------------------------------------------------------------------
async def test_authorization_header_forms(served: Served) -> None:
    check = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="acme"), meter=M)
    key = KEYS["rt_acme"]

    async def code(metadata: list[tuple[str, str]]) -> grpc.StatusCode:
        return await code_of(served.quota.Check(check, metadata=metadata))

    U = grpc.StatusCode.UNAUTHENTICATED
    for bad in ([], [("authorization", "")], [("authorization", "Bearer")],
                [("authorization", "Bearer    ")], [("authorization", key)],
                [("authorization", f"Token {key}")], [("authorization", f"Bearer {key} x")],
                [("x-api-key", key)]):
        assert await code(bad) is U, bad
    for good in ([("authorization", f"Bearer {key}")], [("authorization", f"bearer {key}")],
                 [("authorization", f"  BEARER   {key}  ")]):
        assert await code(good) is grpc.StatusCode.OK, good
    # Two authorization headers are ambiguous (which one did the proxy add?): refused,
    # whichever order, and also when both carry the same key.
    admin = KEYS["admin_all"]
    for two in ([("authorization", f"Bearer {key}"), ("authorization", f"Bearer {admin}")],
                [("authorization", "Bearer nobody"), ("authorization", f"Bearer {admin}")],
                [("authorization", f"Basic {admin}"), ("authorization", f"Bearer {admin}")],
                [("authorization", f"Bearer {key}"), ("authorization", f"Bearer {key}")]):
        assert await code(two) is U, two


def test_keys_are_compared_with_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: the digest is compared with each configured key, by
    hmac.compare_digest, however early the match (or none)."""
    ring = KeyRing([auth_mod._entry(i, {"name": n, "sha256": sha(KEYS[n]), "role": r,
                                        "org": o, **({"team": t} if t else {})})
                    for i, (n, (r, o, t)) in enumerate(ENTRIES.items())])
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    for token in (KEYS["rt_acme"], KEYS["lead_acme_sales"], "nobody"):
        calls.clear()
        ring.authenticate(token)
        assert len(calls) == len(ENTRIES), token
    assert ring.authenticate(KEYS["rt_acme"]).name == "rt_acme"  # type: ignore[union-attr]


# -- open services --------------------------------------------------------------------------
async def test_reflection_is_open_and_lists_the_services(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)

    async def ask() -> AsyncIterator[Any]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for r in stub.ServerReflectionInfo(ask()):
        names |= {s.name for s in r.list_services_response.service}
    assert {"quotagate.v1.QuotaService", "quotagate.v1.AdminService"} <= names


# -- the keys file --------------------------------------------------------------------------
def test_a_key_listed_twice_is_refused(tmp_path: Path) -> None:
    """The same key twice (with another role or org: which one applies would depend on
    the order) is a ConfigError naming the variable, at start and so on reload."""
    p = tmp_path / "keys.toml"
    p.write_text(keys_toml({"rt_acme": ("runtime", "acme", "")}) + "\n" +
                 f'[[keys]]\nname = "again"\nsha256 = "{sha(KEYS["rt_acme"]).upper()}"\n'
                 'role = "admin"\norg = "*"\n')
    with pytest.raises(ConfigError) as e:
        load_keys(p)
    assert e.value.field == "QUOTAGATE_API_KEYS_FILE"
    assert "keys[1]" in str(e.value) and "keys[0]" in str(e.value)


def test_fields_that_are_not_strings_are_refused(tmp_path: Path) -> None:
    """`org = ["acme", "beta"]` does not scope a key to two orgs (nor to an org named
    "['acme', 'beta']"): refused, like any other malformed entry."""
    p = tmp_path / "keys.toml"
    for field, value in (("org", '["acme", "beta"]'), ("org", "7"), ("role", '["admin"]'),
                         ("team", "1"), ("name", "{ a = 1 }")):
        base = {"name": '"k"', "sha256": f'"{sha("x")}"', "role": '"team_lead"',
                "org": '"acme"', "team": '"sales"'}
        base[field] = value
        p.write_text("[[keys]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()))
        with pytest.raises(ConfigError) as e:
            load_keys(p)
        assert e.value.field == "QUOTAGATE_API_KEYS_FILE", field
        assert f"keys[0].{field}" in str(e.value)


async def test_a_bad_keys_file_stops_the_start(redis_server: RedisServer,
                                               tmp_path: Path) -> None:
    p = tmp_path / "keys.toml"
    p.write_text(keys_toml({"rt_acme": ("runtime", "acme", "")}) + "\n" +
                 keys_toml({"rt_acme": ("admin", "*", "")}))
    app = App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, grace_seconds=0,
                       api_keys_file=str(p)))
    with pytest.raises(ConfigError) as e:
        await app.start()
    assert e.value.field == "QUOTAGATE_API_KEYS_FILE"
    assert app.server is None


async def test_reload_applies_a_changed_role_and_org_and_drops_removed_keys(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a poll of the change (2 s documented; shortened here) a demoted admin is a
    runtime key, a moved key serves its new org only, and a removed key is refused."""
    # the server's poll loop sleeps auth.KEYS_POLL_SECONDS; reload now instead of waiting
    ring = served.app.interceptors[-1].auth.keyring  # type: ignore[attr-defined]
    topup = admin_calls("acme")["TopUp"]
    check = {o: quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id=o), meter=M)
             for o in ("acme", "beta")}
    assert await code_of(served.admin.TopUp(topup, metadata=md("admin_acme"))) is \
        grpc.StatusCode.OK
    entries = dict(ENTRIES)
    entries["admin_acme"] = ("runtime", "acme", "")  # demoted
    entries["rt_acme"] = ("runtime", "beta", "")  # moved to another org
    del entries["rt_all"]  # removed
    served.keys_path.write_text(keys_toml(entries))
    assert ring.reload_if_changed()
    assert await code_of(served.admin.TopUp(topup, metadata=md("admin_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(served.quota.Check(check["acme"], metadata=md("rt_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(served.quota.Check(check["beta"], metadata=md("rt_acme"))) is \
        grpc.StatusCode.OK
    assert await code_of(served.quota.Check(check["acme"], metadata=md("rt_all"))) is \
        grpc.StatusCode.UNAUTHENTICATED


async def test_the_server_polls_the_keys_file(redis_server: RedisServer, redis: Any,
                                              clock: ManualClock, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll itself, end to end: a removed key is refused within the poll interval."""
    monkeypatch.setattr(auth_mod, "KEYS_POLL_SECONDS", 0.05)
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml({"rt_acme": ENTRIES["rt_acme"], "rt_all": ENTRIES["rt_all"]}))
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(path)),
                    clock=clock).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        check = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="acme"), meter=M)
        assert await code_of(quota.Check(check, metadata=md("rt_all"))) is \
            grpc.StatusCode.OK
        path.write_text(keys_toml({"rt_acme": ENTRIES["rt_acme"]}))
        for _ in range(40):
            if await code_of(quota.Check(check, metadata=md("rt_all"))) is \
                    grpc.StatusCode.UNAUTHENTICATED:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the removed key still works")
    finally:
        await channel.close()
        await stop_or_report(app)


def test_a_deleted_keys_file_is_reported(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """Deleting the file does not revoke the keys in force (as a file that does not
    parse: a Secret being swapped, an editor's rename), but it is not silent either: an
    error is logged, once, until the file is back."""
    p = tmp_path / "keys.toml"
    p.write_text(keys_toml({"rt_acme": ENTRIES["rt_acme"]}))
    ring = KeyRing.from_file(p)
    p.unlink()
    with caplog.at_level(logging.ERROR, logger="quotagate.server.auth"):
        assert not ring.reload_if_changed()
        assert not ring.reload_if_changed()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(p) in errors[0].getMessage()
    assert ring.authenticate(KEYS["rt_acme"]) is not None
    p.write_text(keys_toml({"rt_all": ENTRIES["rt_all"]}))
    assert ring.reload_if_changed()
    assert ring.authenticate(KEYS["rt_acme"]) is None


@pytest.mark.parametrize("form", ["keys = []\n", '{"keys": []}'])
async def test_a_keys_file_that_says_no_keys_revokes_every_key(
        served: Served, form: str, caplog: pytest.LogCaptureFixture) -> None:
    """To revoke every key at once without a restart, the file says so: `keys = []` (or
    JSON `{"keys": []}`): every call is then UNAUTHENTICATED, and an error says why.
    An empty file (one being written) or a file without `keys` keeps the keys in force."""
    ring = served.app.interceptors[-1].auth.keyring  # type: ignore[attr-defined]
    check = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="acme"), meter=M)
    for unclear in ("", "# nothing yet\n", "[other]\nx = 1\n"):
        served.keys_path.write_text(unclear)
        assert not ring.reload_if_changed()
        assert await code_of(served.quota.Check(check, metadata=md("rt_all"))) is \
            grpc.StatusCode.OK
    served.keys_path.write_text(form)
    with caplog.at_level(logging.ERROR, logger="quotagate.server.auth"):
        assert ring.reload_if_changed()
    assert any("no keys" in r.getMessage() for r in caplog.records)
    for name in ("rt_all", "rt_acme", "admin_acme"):
        assert await code_of(served.quota.Check(check, metadata=md(name))) is \
            grpc.StatusCode.UNAUTHENTICATED
    served.keys_path.write_text(keys_toml({"rt_all": ENTRIES["rt_all"]}))
    assert ring.reload_if_changed()  # and back
    assert await code_of(served.quota.Check(check, metadata=md("rt_all"))) is \
        grpc.StatusCode.OK


def test_a_keys_file_that_says_no_keys_still_stops_the_start(tmp_path: Path) -> None:
    """At start a file without keys is a mistake, not a revocation: serve refuses it."""
    p = tmp_path / "keys.toml"
    p.write_text("keys = []\n")
    with pytest.raises(ConfigError, match="defines no keys"):
        KeyRing.from_file(p)


# -- auth off only on loopback --------------------------------------------------------------
async def test_a_host_name_that_only_looks_like_loopback_needs_keys(
        redis_server: RedisServer) -> None:
    """`127.…` is loopback as an IPv4 address, not as the start of a host name (which
    may resolve anywhere): without a keys file such a listen address is refused first."""
    for listen in ("127.attacker.example:0", "127.0.0.1.example:0", "localhost.example:0"):
        app = App(Settings(listen=listen, redis_url=redis_server.url, grace_seconds=0))
        with pytest.raises(ConfigError) as e:
            await app.start()
        assert e.value.field == "QUOTAGATE_API_KEYS_FILE", listen
        assert app.server is None and app.redis is None


def test_loopback_addresses_may_run_without_keys() -> None:
    for listen in ("127.0.0.1:0", "127.1.2.3:50051", "localhost:0", "[::1]:0"):
        assert auth_mod.keyring_for(Settings(listen=listen)) is None, listen


async def test_an_open_stream_ends_when_its_key_is_revoked(served: Served) -> None:
    """WatchEvents and WatchStatus are checked when opened, and again once the keys were
    reloaded: a removed (or re-scoped) key's stream gets nothing more and ends
    UNAUTHENTICATED (PERMISSION_DENIED), instead of streaming the org for ever."""
    led = served.ledger
    await led.upsert_assistant("acme", "bot")
    await led.upsert_assistant("acme", "helper")
    ring = served.app.interceptors[-1].auth.keyring  # type: ignore[attr-defined]
    events = served.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"),
                                      metadata=md("admin_acme"))
    status = served.quota.WatchStatus(quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot"]), metadata=md("rt_acme"))
    first = await asyncio.wait_for(status.read(), 5)
    assert first.assistant_id == "bot" and first.active
    await events.initial_metadata()  # subscribed
    await led.upsert_assistant("acme", "helper", enabled=False)
    got = await asyncio.wait_for(events.read(), 5)
    assert got.event.type == "assistant.deactivated"
    entries = dict(ENTRIES)
    del entries["admin_acme"]  # revoked
    entries["rt_acme"] = ("runtime", "beta", "")  # moved to another org
    served.keys_path.write_text(keys_toml(entries))
    assert ring.reload_if_changed()
    await led.upsert_assistant("acme", "bot", enabled=False)
    for call, want in ((events, grpc.StatusCode.UNAUTHENTICATED),
                       (status, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            msg = await asyncio.wait_for(call.read(), 5)
            raise AssertionError(f"a revoked key was sent {msg}")
        assert e.value.code() is want


async def test_an_idle_stream_ends_at_the_reload_that_revokes_its_key(served: Served) -> None:
    """A stream with nothing to send does not wait for its next message to learn that
    its key was revoked: the reload itself ends it (UNAUTHENTICATED for a removed key,
    PERMISSION_DENIED for one moved to another org). A stream whose key still holds goes
    on and still gets what comes next."""
    led = served.ledger
    await led.upsert_assistant("acme", "bot")
    ring = served.app.interceptors[-1].auth.keyring  # type: ignore[attr-defined]
    events = served.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"),
                                      metadata=md("admin_acme"))
    status = served.quota.WatchStatus(quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot"]), metadata=md("rt_acme"))
    kept = served.quota.WatchStatus(quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot"]), metadata=md("rt_all"))
    for call in (status, kept):
        first = await asyncio.wait_for(call.read(), 5)
        assert first.assistant_id == "bot" and first.active
    await events.initial_metadata()  # subscribed, and idle: nothing happens in the org
    entries = dict(ENTRIES)
    del entries["admin_acme"]  # revoked
    entries["rt_acme"] = ("runtime", "beta", "")  # moved to another org
    served.keys_path.write_text(keys_toml(entries))
    assert ring.reload_if_changed()
    for call, want in ((events, grpc.StatusCode.UNAUTHENTICATED),
                       (status, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            msg = await asyncio.wait_for(call.read(), 5)
            raise AssertionError(f"a revoked key was sent {msg}")
        assert e.value.code() is want
    await led.upsert_assistant("acme", "bot", enabled=False)
    change = await asyncio.wait_for(kept.read(), 5)
    assert change.assistant_id == "bot" and not change.active
    kept.cancel()


async def test_fail_open_settles_no_other_orgs_hold(tmp_path: Path, clock: ManualClock) -> None:
    """QUOTAGATE_FAIL_OPEN with Redis gone: a hold of another org is PERMISSION_DENIED
    when this process knows its org, else UNAVAILABLE (the org cannot be looked up) —
    never answered as done; a fail-open id (which holds nothing) is answered."""
    own = RedisServer().start()
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(ENTRIES))
    app = None
    try:
        app = await App(Settings(listen="127.0.0.1:0", redis_url=own.url, shards=64,
                                 sweep_interval_ms=600_000, grace_seconds=0,
                                 data_dir=tmp_path, metrics_listen="127.0.0.1:0",
                                 fail_open=True, api_keys_file=str(path)),
                        clock=clock).start()
        led = app.ledger
        assert led is not None
        await led.upsert_plan("pro", [Allowance(M, 1_000)])
        await led.upsert_org("beta", "pro")
        await led.upsert_org("acme", "pro")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        known = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id="beta"), idempotency_key="k",
            charges=[common_pb2.Charge(meter=M, amount=5)]), metadata=md("admin_all"))
        unknown = await led.reserve(Subject("beta"), [Charge(M, 5)], idempotency_key="u")
        own.stop()
        for rid, want in ((known.reservation_id, grpc.StatusCode.PERMISSION_DENIED),
                          (unknown.reservation_id, grpc.StatusCode.UNAVAILABLE)):
            for call in (quota.Commit(quota_pb2.CommitRequest(reservation_id=rid),
                                      metadata=md("rt_acme"), timeout=5),
                         quota.Refund(quota_pb2.RefundRequest(reservation_id=rid),
                                      metadata=md("rt_acme"), timeout=5)):
                assert await code_of(call) is want, rid
        opened = await quota.Reserve(quota_pb2.ReserveRequest(
            subject=common_pb2.Subject(org_id="acme"), idempotency_key="o",
            charges=[common_pb2.Charge(meter=M, amount=5)]), metadata=md("rt_acme"),
            timeout=5)
        assert opened.reservation_id.startswith("open.")
        assert await code_of(quota.Commit(quota_pb2.CommitRequest(
            reservation_id=opened.reservation_id), metadata=md("rt_acme"), timeout=5)) is \
            grpc.StatusCode.OK
        await channel.close()
    finally:
        if app is not None:
            await stop_or_report(app)
        own.close()


def test_a_team_lead_key_scoped_to_every_org_is_refused(tmp_path: Path) -> None:
    """A team lead's team is a team of one org: `org = "*"` would let it set the seats of
    a team of that name in every org."""
    p = tmp_path / "keys.toml"
    p.write_text(f'[[keys]]\nname = "lead"\nsha256 = "{sha("x")}"\nrole = "team_lead"\n'
                 'org = "*"\nteam = "sales"\n')
    with pytest.raises(ConfigError) as e:
        load_keys(p)
    assert e.value.field == "QUOTAGATE_API_KEYS_FILE" and "keys[0].org" in str(e.value)


async def test_no_org_may_be_named_like_every_org(server: Grpc, redis: Any) -> None:
    """"*" in an API key means every org: an org of that name would be reachable by the
    keys of every org's scope, so UpsertOrg refuses it and creates nothing."""
    from quotagate.v1 import admin_pb2

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await server.admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="*", plan="pro"))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "org_id" in e.value.details()
    assert not [k for k in await redis.keys("*") if b"org:%2A" in k or k.endswith(b"org:*")]
