"""API keys, roles and org scopes (DESIGN §6) on the real server over real mTLS: a
throwaway CA, a server certificate and a client certificate made here."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.errors import ConfigError
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.server.auth import KeyRing, load_keys
from quotagate.settings import Settings
from quotagate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    quota_pb2,
    quota_pb2_grpc,
)
from redis_server import RedisServer

M = "message_tokens"
# the keys callers hold; the server's file holds only their SHA-256
KEYS = {
    "runtime_acme": "qg_rt_acme_7b1f0c9d2e4a6b8c0d1e2f3a4b5c6d7e",
    "runtime_beta": "qg_rt_beta_1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d",
    "admin_all": "qg_admin_all_0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "admin_acme": "qg_admin_acme_a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "lead_sales": "qg_lead_sales_99aa88bb77cc66dd55ee44ff33001122",
}
ENTRIES = [
    {"name": "runtime_acme", "role": "runtime", "org": "acme"},
    {"name": "runtime_beta", "role": "runtime", "org": "beta"},
    {"name": "admin_all", "role": "admin", "org": "*"},
    {"name": "admin_acme", "role": "admin", "org": "acme"},
    {"name": "lead_sales", "role": "team_lead", "org": "acme", "team": "sales"},
]


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# -- a throwaway PKI -------------------------------------------------------------------
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    ca_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("quotagate test CA", ca_key, _name("quotagate test CA"), ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca.subject, ca_key, server=True)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = _cert("runtime", cli_key, ca.subject, ca_key)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(srv.public_bytes(pem))
    (d / "server.key").write_bytes(_pem_key(srv_key))
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", cli.public_bytes(pem),
               _pem_key(cli_key), ca.public_bytes(pem))


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.toml"
    lines = []
    for e in ENTRIES:
        lines.append("[[keys]]")
        lines += [f'{k} = "{v}"' for k, v in e.items()]
        lines.append(f'sha256 = "{sha(KEYS[e["name"]])}"')
        lines.append("")
    p.write_text("\n".join(lines))
    return p


class Secure:
    def __init__(self, app: App, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.channel = channel
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)


def tls_channel(port: int, pki: Pki, client_cert: bool = True) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=pki.client_key if client_cert else None,
        certificate_chain=pki.client_cert if client_cert else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


@pytest.fixture
async def secure(redis_server: RedisServer, redis: Any, clock: ManualClock, pki: Pki,
                 keys_file: Path) -> AsyncIterator[Secure]:
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0,
                        api_keys_file=str(keys_file), tls_cert=str(pki.server_cert),
                        tls_key=str(pki.server_key), tls_client_ca=str(pki.ca))
    app = await App(settings, clock=clock).start()
    assert app.ledger is not None
    await app.ledger.upsert_plan("pro", [Allowance(M, 1_000_000)])
    for org in ("acme", "beta"):
        await app.ledger.upsert_org(org, "pro")
        await app.ledger.upsert_team(org, "sales")
        await app.ledger.upsert_team(org, "support")
    await app.ledger.upsert_seat("acme", "bob", "support")
    channel = tls_channel(app.port, pki)
    yield Secure(app, channel)
    await channel.close()
    await app.stop()


def auth(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[name]}")]


def reserve(org: str, key: str = "k1") -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(subject=common_pb2.Subject(org_id=org), idempotency_key=key,
                                    charges=[common_pb2.Charge(meter=M, amount=10)])


def topup(org: str) -> admin_pb2.TopUpRequest:
    return admin_pb2.TopUpRequest(org_id=org, meter=M, amount=100, purchase_id="p1")


async def code_of(aw: Any) -> grpc.StatusCode:
    try:
        await aw
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- authentication ----------------------------------------------------------------------
async def test_no_or_unknown_key_is_unauthenticated(secure: Secure) -> None:
    assert await code_of(secure.quota.Reserve(reserve("acme"))) is \
        grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(secure.admin.TopUp(topup("acme"))) is grpc.StatusCode.UNAUTHENTICATED
    bad = [("authorization", "Bearer qg_nobody")]
    assert await code_of(secure.quota.Reserve(reserve("acme"), metadata=bad)) is \
        grpc.StatusCode.UNAUTHENTICATED
    basic = [("authorization", f"Basic {KEYS['admin_all']}")]
    assert await code_of(secure.admin.TopUp(topup("acme"), metadata=basic)) is \
        grpc.StatusCode.UNAUTHENTICATED
    call = secure.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="acme"))
    assert await code_of(call.read()) is grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_key_of_the_same_length_is_rejected(secure: Secure) -> None:
    good = KEYS["admin_all"]
    wrong = good[:-1] + ("0" if good[-1] != "0" else "1")  # one character off
    assert len(wrong) == len(good)
    assert await code_of(secure.admin.TopUp(topup("acme"), metadata=[
        ("authorization", f"Bearer {wrong}")])) is grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(secure.admin.TopUp(topup("acme"), metadata=auth("admin_all"))) is \
        grpc.StatusCode.OK


async def test_health_is_open(secure: Secure) -> None:
    stub = health_pb2_grpc.HealthStub(secure.channel)
    r = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_client_without_certificate_is_refused(secure: Secure, pki: Pki) -> None:
    ch = tls_channel(secure.app.port, pki, client_cert=False)
    try:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        assert await code_of(stub.Reserve(reserve("acme"), metadata=auth("runtime_acme"),
                                          timeout=5)) is grpc.StatusCode.UNAVAILABLE
    finally:
        await ch.close()


async def test_plaintext_client_cannot_talk_to_the_tls_port(secure: Secure) -> None:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{secure.app.port}")
    try:
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        assert await code_of(stub.Reserve(reserve("acme"), metadata=auth("runtime_acme"),
                                          timeout=5)) is grpc.StatusCode.UNAVAILABLE
    finally:
        await ch.close()


# -- runtime keys ------------------------------------------------------------------------
async def test_runtime_key_reserves_for_its_org_only(secure: Secure) -> None:
    r = await secure.quota.Reserve(reserve("acme"), metadata=auth("runtime_acme"))
    assert r.decision == common_pb2.DECISION_GRANTED
    assert await code_of(secure.quota.Reserve(reserve("beta"), metadata=auth("runtime_acme"))) \
        is grpc.StatusCode.PERMISSION_DENIED
    for call in (secure.quota.Check(quota_pb2.CheckRequest(
            subject=common_pb2.Subject(org_id="beta")), metadata=auth("runtime_acme")),
                 secure.quota.GetBalance(quota_pb2.GetBalanceRequest(
                     subject=common_pb2.Subject(org_id="beta")), metadata=auth("runtime_acme"))):
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    # and the own org's reservation may be committed
    c = await secure.quota.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id),
                                  metadata=auth("runtime_acme"))
    assert c.state == common_pb2.HOLD_STATE_COMMITTED


async def test_runtime_key_cannot_settle_another_orgs_reservation(secure: Secure) -> None:
    # made through gRPC by beta's key (this process remembers its org) ...
    via_grpc = await secure.quota.Reserve(reserve("beta"), metadata=auth("runtime_beta"))
    # ... and straight in the ledger (the org is looked up in the hold itself)
    assert secure.app.ledger is not None
    direct = await secure.app.ledger.reserve(Subject("beta"), [Charge(M, 10)],
                                             idempotency_key="direct")
    for rid in (via_grpc.reservation_id, direct.reservation_id):
        for call in (
                secure.quota.Commit(quota_pb2.CommitRequest(reservation_id=rid),
                                    metadata=auth("runtime_acme")),
                secure.quota.Refund(quota_pb2.RefundRequest(reservation_id=rid),
                                    metadata=auth("runtime_acme")),
                secure.quota.Extend(quota_pb2.ExtendRequest(reservation_id=rid, ttl_seconds=60),
                                    metadata=auth("runtime_acme"))):
            assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    r = await secure.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=direct.reservation_id), metadata=auth("runtime_beta"))
    assert r.state == common_pb2.HOLD_STATE_REFUNDED
    # an unknown reservation answers as without auth
    unknown = "r1." + "0" * 32
    assert await code_of(secure.quota.Commit(quota_pb2.CommitRequest(reservation_id=unknown),
                                             metadata=auth("runtime_acme"))) is \
        grpc.StatusCode.NOT_FOUND


async def test_runtime_key_cannot_top_up_or_administer(secure: Secure) -> None:
    for call in (secure.admin.TopUp(topup("acme"), metadata=auth("runtime_acme")),
                 secure.admin.UpsertSeat(admin_pb2.UpsertSeatRequest(
                     org_id="acme", seat_id="x", team_id="sales"),
                     metadata=auth("runtime_acme"))):
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED
    events = secure.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"),
                                      metadata=auth("runtime_acme"))
    assert await code_of(events.read()) is grpc.StatusCode.PERMISSION_DENIED


async def test_watch_status_is_scoped(secure: Secure) -> None:
    other = secure.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="beta"),
                                     metadata=auth("runtime_acme"))
    assert await code_of(other.read()) is grpc.StatusCode.PERMISSION_DENIED
    assert secure.app.ledger is not None
    await secure.app.ledger.upsert_assistant("acme", "bot")
    own = secure.quota.WatchStatus(quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot"]), metadata=auth("runtime_acme"))
    first = await own.read()
    assert first.assistant_id == "bot" and first.active
    own.cancel()


async def test_scoped_key_without_org_is_invalid_argument(secure: Secure) -> None:
    assert await code_of(secure.quota.Reserve(reserve(""), metadata=auth("runtime_acme"))) is \
        grpc.StatusCode.INVALID_ARGUMENT


# -- admin keys ------------------------------------------------------------------------
async def test_admin_key_can_top_up_in_scope(secure: Secure) -> None:
    r = await secure.admin.TopUp(topup("acme"), metadata=auth("admin_acme"))
    assert r.applied
    assert await code_of(secure.admin.TopUp(topup("beta"), metadata=auth("admin_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED
    assert (await secure.admin.TopUp(topup("beta"), metadata=auth("admin_all"))).applied
    # and it may use the runtime calls of its org
    assert (await secure.quota.Reserve(reserve("acme"), metadata=auth("admin_acme"))).decision \
        == common_pb2.DECISION_GRANTED


async def test_plans_are_global_and_need_an_admin_of_every_org(secure: Secure) -> None:
    plan = admin_pb2.UpsertPlanRequest(name="gold", allowances=[
        admin_pb2.Allowance(meter=M, monthly=5)])
    assert await code_of(secure.admin.UpsertPlan(plan, metadata=auth("admin_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(secure.admin.UpsertPlan(plan, metadata=auth("admin_all"))) is \
        grpc.StatusCode.OK


# -- team leads ------------------------------------------------------------------------
async def test_team_lead_sets_seats_of_its_own_team_only(secure: Secure) -> None:
    limits = [admin_pb2.SeatLimit(meter=M, monthly_limit=500)]
    ok = await secure.admin.UpsertSeat(admin_pb2.UpsertSeatRequest(
        org_id="acme", seat_id="alice", team_id="sales", limits=limits),
        metadata=auth("lead_sales"))
    assert ok.created
    for req in (
            admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="carol", team_id="support",
                                        limits=limits),  # another team
            admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="bob", team_id="sales",
                                        limits=limits),  # pulling support's seat over
            admin_pb2.UpsertSeatRequest(org_id="beta", seat_id="alice", team_id="sales",
                                        limits=limits)):  # another org
        assert await code_of(secure.admin.UpsertSeat(req, metadata=auth("lead_sales"))) is \
            grpc.StatusCode.PERMISSION_DENIED
    for call in (secure.admin.TopUp(topup("acme"), metadata=auth("lead_sales")),
                 secure.admin.UpsertTeam(admin_pb2.UpsertTeamRequest(
                     org_id="acme", team_id="sales", seats=9), metadata=auth("lead_sales"))):
        assert await code_of(call) is grpc.StatusCode.PERMISSION_DENIED


# -- configuration -----------------------------------------------------------------------
def test_keys_are_stored_hashed(keys_file: Path) -> None:
    text = keys_file.read_text()
    for key in KEYS.values():
        assert key not in text and sha(key) in text
    ring = KeyRing(load_keys(keys_file))
    assert all(len(k.sha256) == 32 for k in ring.keys)
    assert ring.authenticate(KEYS["lead_sales"]).team == "sales"  # type: ignore[union-attr]
    assert ring.authenticate(KEYS["lead_sales"].upper()) is None
    assert ring.authenticate("") is None


def test_keys_file_in_json_and_its_errors(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    p.write_text(json.dumps({"keys": [{"name": "a", "sha256": sha("x"), "role": "admin",
                                       "org": "*"}]}))
    assert KeyRing(load_keys(p)).authenticate("x") is not None
    bad = [
        [{"name": "a", "key": "x", "role": "admin", "org": "*"}],  # a plain key: never
        [{"name": "a", "sha256": "abc", "role": "admin", "org": "*"}],
        [{"name": "a", "sha256": sha("x"), "role": "root", "org": "*"}],
        [{"name": "a", "sha256": sha("x"), "role": "team_lead", "org": "acme"}],  # no team
        [{"name": "a", "sha256": sha("x"), "role": "runtime"}],  # no org
        [],
    ]
    for entries in bad:
        p.write_text(json.dumps(entries))
        with pytest.raises(ConfigError) as e:
            load_keys(p)
        assert e.value.field == "QUOTAGATE_API_KEYS_FILE"
    with pytest.raises(ConfigError) as e:
        load_keys(tmp_path / "missing.toml")
    assert e.value.field == "QUOTAGATE_API_KEYS_FILE"


async def test_off_loopback_without_keys_refuses_to_start(redis_server: RedisServer) -> None:
    for listen in ("0.0.0.0:0", "[::]:0", "10.1.2.3:0"):
        app = App(Settings(listen=listen, redis_url=redis_server.url, grace_seconds=0))
        with pytest.raises(ConfigError) as e:
            await app.start()
        assert e.value.field == "QUOTAGATE_API_KEYS_FILE"
        assert "QUOTAGATE_API_KEYS_FILE" in str(e.value)
        assert app.server is None and app.redis is None  # nothing was started


async def test_off_loopback_with_keys_starts(redis_server: RedisServer, redis: Any,
                                             keys_file: Path) -> None:
    app = await App(Settings(listen="0.0.0.0:0", redis_url=redis_server.url, shards=64,
                             grace_seconds=0, api_keys_file=str(keys_file))).start()
    try:
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        stub = quota_pb2_grpc.QuotaServiceStub(ch)
        assert await code_of(stub.Reserve(reserve("acme"))) is grpc.StatusCode.UNAUTHENTICATED
        await ch.close()
    finally:
        await app.stop()


async def test_loopback_without_keys_warns(redis_server: RedisServer, redis: Any,
                                           caplog: pytest.LogCaptureFixture) -> None:
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             grace_seconds=0)).start()
    await app.stop()
    assert any("authentication is off" in r.getMessage() for r in caplog.records)


async def test_tls_settings_are_checked(redis_server: RedisServer, pki: Pki) -> None:
    for kw, var in ((dict(tls_cert=str(pki.server_cert)), "QUOTAGATE_TLS_KEY"),
                    (dict(tls_key=str(pki.server_key)), "QUOTAGATE_TLS_CERT"),
                    (dict(tls_client_ca=str(pki.ca)), "QUOTAGATE_TLS_CLIENT_CA"),
                    (dict(tls_cert="/nonexistent.pem", tls_key=str(pki.server_key)),
                     "QUOTAGATE_TLS_CERT")):
        with pytest.raises(ConfigError) as e:
            await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url,
                               **kw)).start()  # type: ignore[arg-type]
        assert e.value.field == var


# -- Envoy's rate-limit service ------------------------------------------------------------
def rls_request(*orgs: str) -> Any:
    from quotagate.envoy import ratelimit_pb2, rls_pb2

    return rls_pb2.RateLimitRequest(domain="ai", hits_addend=3, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value=o)]) for o in orgs])


async def test_envoy_rate_limit_needs_a_key_for_every_descriptors_org(secure: Secure) -> None:
    from quotagate.envoy import rls_pb2_grpc

    rls = rls_pb2_grpc.RateLimitServiceStub(secure.channel)
    assert await code_of(rls.ShouldRateLimit(rls_request("acme"))) is \
        grpc.StatusCode.UNAUTHENTICATED
    # a runtime key is enough, for its own org
    assert await code_of(rls.ShouldRateLimit(rls_request("acme"),
                                             metadata=auth("runtime_acme"))) is \
        grpc.StatusCode.OK
    # one descriptor of another org and the whole call is refused, nothing charged
    assert await code_of(rls.ShouldRateLimit(rls_request("acme", "beta"),
                                             metadata=auth("runtime_acme"))) is \
        grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(rls.ShouldRateLimit(rls_request("acme", "beta"),
                                             metadata=auth("admin_all"))) is \
        grpc.StatusCode.OK
    assert secure.app.ledger is not None
    used = {o: (await secure.app.ledger.get_balance(Subject(o), [M]))[0].used
            for o in ("acme", "beta")}
    assert used == {"acme": 6, "beta": 3}


async def test_refused_calls_are_counted(secure: Secure) -> None:
    """A refusal happens before the handler runs; /metrics counts it all the same (read
    here from the registry the endpoint serves)."""
    from quotagate import telemetry

    reg = telemetry.registry()

    def n(code: str) -> float:
        return reg.get_sample_value("quotagate_rpc_requests_total", {
            "service": "quotagate.v1.QuotaService", "method": "Reserve", "code": code}) or 0.0

    before = {c: n(c) for c in ("UNAUTHENTICATED", "PERMISSION_DENIED", "OK")}
    await code_of(secure.quota.Reserve(reserve("acme")))
    await code_of(secure.quota.Reserve(reserve("beta"), metadata=auth("runtime_acme")))
    await code_of(secure.quota.Reserve(reserve("acme"), metadata=auth("runtime_acme")))
    await asyncio.sleep(0.3)  # a call is counted just after it is answered
    assert {c: n(c) - v for c, v in before.items()} == {
        "UNAUTHENTICATED": 1, "PERMISSION_DENIED": 1, "OK": 1}


async def test_keys_are_reloaded_when_their_file_changes(redis_server: RedisServer, redis: Any,
                                                         clock: ManualClock, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """Rotation without a restart: the new file's keys are in force within a poll, the
    old key is refused, and a file that does not parse leaves the keys as they were."""
    import asyncio

    from quotagate.server import auth as auth_mod

    monkeypatch.setattr(auth_mod, "KEYS_POLL_SECONDS", 0.05)
    path = tmp_path / "keys.toml"

    def write(*names: str) -> None:
        path.write_text("".join(f'[[keys]]\nname = "{n}"\nsha256 = "{sha(KEYS[n])}"\n'
                                f'role = "runtime"\norg = "acme"\n' for n in names))

    write("runtime_acme")
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(path)),
                    clock=clock).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    quota = quota_pb2_grpc.QuotaServiceStub(channel)
    check = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="acme"), meter=M)

    async def code(key: str) -> grpc.StatusCode:
        return await code_of(quota.Check(check, metadata=auth(key)))

    async def until(key: str, want: grpc.StatusCode) -> None:
        for _ in range(100):
            if await code(key) is want:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{key}: never {want}")

    try:
        assert await code("runtime_acme") is grpc.StatusCode.OK
        assert await code("runtime_beta") is grpc.StatusCode.UNAUTHENTICATED
        write("runtime_beta")  # the rotation: acme's key out, a new one in
        await until("runtime_beta", grpc.StatusCode.OK)
        assert await code("runtime_acme") is grpc.StatusCode.UNAUTHENTICATED
        path.write_text("[[keys]]\nname = 'broken'\n")  # no sha256: refused
        await asyncio.sleep(0.3)
        assert await code("runtime_beta") is grpc.StatusCode.OK
        assert "not reloaded" in caplog.text
    finally:
        await channel.close()
        await app.stop()
