"""Bad input, generated: every RPC of QuotaService, AdminService and Envoy's
ShouldRateLimit gets requests with one malformed field at a time, against the real gRPC
server and a real Redis. Each must be answered INVALID_ARGUMENT with a BadRequest naming
that field (or the documented code, e.g. NOT_FOUND for a well-formed id that does not
exist), never UNKNOWN or INTERNAL, and must leave every Redis key as it was.

test_bad_input.py checks fixed examples of the common cases; this file draws them (and
the shapes it leaves out) with hypothesis. The examples share one seeded server per test:
since no bad request may change anything, each one starts from the same state."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import UInt64Value
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Grpc
from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

M = "message_tokens"
METERS = ("message_tokens", "knowledge_tokens", "call_seconds", "transcription_seconds",
          "storage_bytes")
SHARDS = 64  # the `server` fixture's
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
#: a bug, whatever the input: an exception nobody handled
CRASH = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------
CONTROL = st.sampled_from([chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))])
#: valid id material: no control characters, no surrogates (protobuf cannot send them)
SAFE = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=8)


def bad_ids(required: bool = True) -> st.SearchStrategy[str]:
    """Ids break the rules (common.proto): a control character anywhere, more than 128
    bytes of UTF-8 (also where it is 128 characters or fewer), or empty where required."""
    out = [
        st.builds(lambda a, c, b: a + c + b, SAFE, CONTROL, SAFE),
        st.integers(129, 400).map(lambda n: "x" * n),
        st.integers(33, 40).map(lambda n: "\U0001F600" * n),  # 4 bytes a character
        st.integers(43, 60).map(lambda n: "\u20ac" * n),  # 3 bytes a character
        st.integers(65, 90).map(lambda n: "\u00e9" * n),  # 2 bytes a character
    ]
    if required:
        out.append(st.just(""))
    return st.one_of(out)


BIG = st.one_of(st.sampled_from([2**50 + 1, 2**53, 2**53 + 1, 2**62, 2**63 - 1]),
                st.integers(2**50 + 1, 2**63 - 1))
NEGATIVE = st.one_of(st.sampled_from([-1, -(2**50), -(2**53) - 1, -(2**63)]),
                     st.integers(-(2**63), -1))


def bad_amounts(allow_zero: bool = False) -> st.SearchStrategy[int]:
    return st.one_of(NEGATIVE, BIG) if allow_zero else st.one_of(NEGATIVE, BIG, st.just(0))


UNKNOWN_METERS = st.one_of(
    st.sampled_from(["", "gold", "Message_tokens", "message_tokens ", " message_tokens",
                     "message_tokens\x00", "message-tokens", "storage_bytes\n"]),
    st.text(max_size=30).filter(lambda m: m not in METERS))
INT32 = st.integers(-(2**31), 2**31 - 1)
_RID = re.compile(r"r([0-9]{1,6})\.[0-9a-f]{32}")
_OPEN = re.compile(r"open\.[0-9a-f]{32}")
HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)


def _well_formed(rid: str) -> bool:
    m = _RID.fullmatch(rid)
    return (m is not None and int(m.group(1)) < SHARDS) or _OPEN.fullmatch(rid) is not None


#: reservation ids quotagate never issues: every shape around `r<shard>.<32 hex>`
BAD_RIDS = st.one_of(
    st.just(""),
    st.text(max_size=60),
    st.builds(lambda s, h: f"r{s}.{h}", st.integers(SHARDS, 10**6 - 1), HEX32),  # no shard
    st.builds(lambda s, h: f"r{s}.{h}", st.integers(0, SHARDS - 1),
              st.text("0123456789abcdef", max_size=40).filter(lambda h: len(h) != 32)),
    st.builds(lambda s, h: f"r{s}.{h.upper()}", st.integers(0, SHARDS - 1),
              HEX32.filter(lambda h: h != h.upper())),
    st.builds(lambda p, h, s: f"{p}{h}{s}", st.sampled_from(["r1.", "open.", "R1.", "r-1.",
                                                             "r1:", "r\u0661.", " r1."]),
              HEX32, st.sampled_from(["", "\n", " ", "\x00", "0", "\u00b2"])),
).filter(lambda r: not _well_formed(r))
#: well-formed reservation ids that no Reserve returned: NOT_FOUND
UNKNOWN_RIDS = st.builds(lambda s, h: f"r{s}.{h}", st.integers(0, SHARDS - 1), HEX32)


def charge(meter: str, amount: int) -> Any:
    return common_pb2.Charge(meter=meter, amount=amount)


@st.composite
def bad_charges(draw: Any, field: str, allow_zero: bool = False,
                required: bool = True, meters: tuple[str, ...] = METERS) -> tuple[Any, str]:
    """A list of charges with one defect, and the field naming it."""
    chosen = draw(st.lists(st.sampled_from(meters), min_size=1, max_size=len(meters),
                           unique=True))
    items = [charge(m, draw(st.integers(1, 1000))) for m in chosen]
    i = draw(st.integers(0, len(items) - 1))
    kind = draw(st.sampled_from(["amount", "meter", "duplicate"] + (["empty"] * required)))
    if kind == "empty":
        return [], field
    if kind == "amount":
        items[i].amount = draw(bad_amounts(allow_zero))
        return items, f"{field}[{i}].amount"
    if kind == "meter":
        items[i].meter = draw(UNKNOWN_METERS)
        return items, f"{field}[{i}].meter"
    items.insert(i + 1, charge(items[i].meter, draw(st.integers(1, 1000))))
    return items, f"{field}[{i + 1}].meter"


#: labels over 4,096 bytes in all (as the ledger stores them: compact JSON)
BIG_LABELS = st.one_of(
    st.integers(4100, 6000).map(lambda n: {"k": "v" * n}),
    st.integers(140, 200).map(lambda n: {f"label-{i:03}": "x" * 20 for i in range(n)}),
    st.integers(700, 900).map(lambda n: {"k": "\u00e9" * n}),  # escaped: 6 bytes each
)


def bad_timestamps() -> st.SearchStrategy[Timestamp]:
    return st.one_of(
        st.builds(lambda s: Timestamp(seconds=s), st.one_of(
            st.integers(253_402_300_800, 2**63 - 1), st.integers(-(2**63), -62_135_596_801))),
        st.builds(lambda n: Timestamp(seconds=1_700_000_000, nanos=n),
                  st.one_of(st.integers(-(2**31), -1), st.integers(10**9, 2**31 - 1))))


# -- the server, its state, and how to tell what changed ----------------------------------
class World:
    def __init__(self, server: Grpc, redis: Any) -> None:
        self.q, self.a = server.quota, server.admin
        self.rls = rls_pb2_grpc.RateLimitServiceStub(server.channel)
        self.channel = server.channel
        self.redis = redis
        self.held = self.done = ""


@pytest.fixture
async def world(server: Grpc, redis: Any) -> World:
    """acme on plan pro (1,000 message tokens), team t1 with seat s1, team t2, assistant
    bot; a held and a committed reservation; a top-up, a transfer and an adjustment."""
    w = World(server, redis)
    a = w.a
    await a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="pro", allowances=[
        admin_pb2.Allowance(meter=M, monthly=1_000)]))
    await a.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro", seats=2))
    for team in ("t1", "t2"):
        await a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id=team, seats=1))
    await a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="s1", team_id="t1"))
    await a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(org_id="acme", assistant_id="bot"))
    await a.TopUp(admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=100, purchase_id="p0"))
    await a.Transfer(admin_pb2.TransferRequest(org_id="acme", meter=M, amount=5,
                                               bucket=admin_pb2.BUCKET_MONTHLY,
                                               to_team_id="t1", idempotency_key="x0"))
    await a.Adjust(admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=3, reason="r",
                                           idempotency_key="a0"))
    subj = common_pb2.Subject(org_id="acme")
    held = await w.q.Reserve(quota_pb2.ReserveRequest(subject=subj, charges=[charge(M, 10)],
                                                      idempotency_key="held"))
    done = await w.q.Reserve(quota_pb2.ReserveRequest(subject=subj, charges=[charge(M, 20)],
                                                      idempotency_key="done"))
    await w.q.Commit(quota_pb2.CommitRequest(reservation_id=done.reservation_id))
    w.held, w.done = held.reservation_id, done.reservation_id
    return w


async def snapshot(redis: Any) -> dict[bytes, Any]:
    """Every key with its value. Streams by entries ever added (the syncer deletes the
    ledger entries it copied to SQL; that is not the request's doing)."""
    keys = [k async for k in redis.scan_iter("*", count=1000)]
    pipe = redis.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = await pipe.execute()
    read = {b"hash": pipe.hgetall, b"string": pipe.get, b"set": pipe.smembers,
            b"list": lambda k: pipe.lrange(k, 0, -1),
            b"zset": lambda k: pipe.zrange(k, 0, -1, withscores=True),
            b"stream": pipe.xinfo_stream}
    for k, t in zip(keys, types, strict=True):
        read.get(t, pipe.type)(k)
    out: dict[bytes, Any] = {}
    for k, t, v in zip(keys, types, await pipe.execute(), strict=True):
        out[k] = (v["entries-added"], v["last-generated-id"]) if t == b"stream" else v
    return out


def violation(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "INVALID_ARGUMENT without a google.rpc.Status"
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return str(bad.field_violations[0].field)
    raise AssertionError("INVALID_ARGUMENT without a BadRequest detail")


async def answer(call: Callable[[Any], Any], request: Any) -> grpc.aio.AioRpcError | None:
    """The error the call ends with; None when it was accepted. A server stream counts as
    accepted when its first message comes, or nothing within half a second."""
    try:
        got = call(request)
        if isinstance(got, grpc.aio.UnaryStreamCall):
            try:
                await asyncio.wait_for(got.read(), 0.5)
            except TimeoutError:
                pass
            finally:
                got.cancel()
        else:
            await got
    except grpc.aio.AioRpcError as e:
        return e
    return None


async def rejected(w: World, call: Callable[[Any], Any], request: Any, field: str,
                   code: grpc.StatusCode = INVALID) -> None:
    before = await snapshot(w.redis)
    assert before, "nothing seeded"
    err = await answer(call, request)
    assert err is not None, f"accepted, expected {code.name} naming {field!r}: {request}"
    assert err.code() not in CRASH, f"unhandled: {err.code()} {err.details()}: {request}"
    assert err.code() == code, f"{err.code()} {err.details()}: {request}"
    if code is INVALID:
        assert violation(err) == field, f"{err.details()}: {request}"
    assert field in (err.details() or ""), f"{err.details()}: {request}"
    assert await snapshot(w.redis) == before, f"changed Redis: {request}"


# -- QuotaService ------------------------------------------------------------------------
SUBJECT_FIELDS = ("org_id", "team_id", "seat_id", "assistant_id")


@st.composite
def bad_subject(draw: Any, prefix: str = "subject") -> tuple[Any, str]:
    name = draw(st.sampled_from(SUBJECT_FIELDS))
    s = common_pb2.Subject(org_id="acme")
    setattr(s, name, draw(bad_ids(required=name == "org_id")))
    return s, f"{prefix}.{name}"


@st.composite
def reserve_cases(draw: Any) -> tuple[Any, str]:
    r = quota_pb2.ReserveRequest(subject=common_pb2.Subject(org_id="acme"),
                                 charges=[charge(M, 1)], idempotency_key="fresh")
    kind = draw(st.sampled_from(["subject", "key", "feature", "action", "action+charges",
                                 "charges", "ttl", "partial", "labels", "key reuse"]))
    if kind == "subject":
        s, field = draw(bad_subject())
        r.subject.CopyFrom(s)
        return r, field
    if kind == "key":
        r.idempotency_key = draw(bad_ids())
        return r, "idempotency_key"
    if kind == "feature":
        r.feature = draw(bad_ids(required=False))
        return r, "feature"
    if kind in ("action", "action+charges"):
        if kind == "action":
            del r.charges[:]
            r.action = draw(st.one_of(bad_ids(required=False), st.sampled_from(
                ["no_such_action", "AI_SEQUENCE", "ai_sequence "])))
        else:
            r.action = "ai_sequence"
        return r, "action"
    if kind == "charges":
        items, field = draw(bad_charges("charges"))
        del r.charges[:]
        r.charges.extend(items)
        return r, field
    if kind == "ttl":
        r.ttl_seconds = draw(st.one_of(st.integers(-(2**31), -1), st.integers(86_401, 2**31 - 1)))
        return r, "ttl_seconds"
    if kind == "partial":
        r.allow_partial = True
        r.charges.append(charge(draw(st.sampled_from(METERS[1:])), 1))
        return r, "allow_partial"
    if kind == "labels":
        r.labels.update(draw(BIG_LABELS))
        return r, "labels"
    # the key of the held reservation with another request
    r.idempotency_key = "held"
    r.charges[0].amount = draw(st.integers(1, 1000).filter(lambda n: n != 10))
    return r, "idempotency_key"


@SETTINGS
@given(case=reserve_cases())
async def test_reserve(world: World, case: tuple[Any, str]) -> None:
    await rejected(world, world.q.Reserve, *case)


@st.composite
def hold_cases(draw: Any, rpc: str) -> tuple[str, Any, str, grpc.StatusCode]:
    """Commit / Refund / Extend: a bad or unknown reservation id, or a bad other field."""
    w_field = {"Commit": "actual", "Refund": "amount", "Extend": "additional"}[rpc]
    kinds = ["bad rid", "unknown rid", "charges", "not in hold"]
    kinds += {"Commit": ["labels"], "Refund": ["reason"], "Extend": ["ttl", "settled"]}[rpc]
    kind = draw(st.sampled_from(kinds))
    rid, fields, field, code = "held", {}, "reservation_id", INVALID
    if kind == "bad rid":
        rid = draw(BAD_RIDS)
    elif kind == "unknown rid":
        rid, code = draw(UNKNOWN_RIDS), NOT_FOUND
    elif kind == "charges":
        items, field = draw(bad_charges(w_field, allow_zero=rpc == "Commit", required=False))
        if not items:  # empty is valid here: make it the zero/negative amount case
            items, field = [charge(M, -1)], f"{w_field}[0].amount"
        fields[w_field] = items
    elif kind == "not in hold":
        rid = draw(st.sampled_from(["held", "done"])) if rpc == "Refund" else "held"
        fields[w_field] = [charge(M, 1), charge(draw(st.sampled_from(METERS[1:])), 1)]
        field = w_field
    elif kind == "labels":
        fields["labels"], field = draw(BIG_LABELS), "labels"
    elif kind == "reason":
        fields["reason"], field = "r" * draw(st.integers(1025, 3000)), "reason"
    elif kind == "ttl":
        fields["ttl_seconds"] = draw(st.one_of(st.integers(-(2**31), -1),
                                               st.integers(86_401, 2**31 - 1)))
        field = "ttl_seconds"
    else:  # Extend of a committed reservation: documented FAILED_PRECONDITION
        rid, code = "done", FAILED
    return rid, fields, field, code


@pytest.mark.parametrize("rpc", ["Commit", "Refund", "Extend"])
@SETTINGS
@given(data=st.data())
async def test_commit_refund_extend(world: World, rpc: str, data: Any) -> None:
    rid, fields, field, code = data.draw(hold_cases(rpc))
    rid = {"held": world.held, "done": world.done}.get(rid, rid)
    request = {"Commit": quota_pb2.CommitRequest, "Refund": quota_pb2.RefundRequest,
               "Extend": quota_pb2.ExtendRequest}[rpc](reservation_id=rid, **fields)
    await rejected(world, getattr(world.q, rpc), request, field, code)


@st.composite
def check_cases(draw: Any) -> tuple[Any, str]:
    r = quota_pb2.CheckRequest(subject=common_pb2.Subject(org_id="acme"), meter=M)
    kind = draw(st.sampled_from(["subject", "meter", "feature"]))
    if kind == "subject":
        s, field = draw(bad_subject())
        r.subject.CopyFrom(s)
        return r, field
    if kind == "meter":  # empty is the default meter
        r.meter = draw(UNKNOWN_METERS.filter(bool))
        return r, "meter"
    r.feature = draw(bad_ids(required=False))
    return r, "feature"


@SETTINGS
@given(case=check_cases())
async def test_check(world: World, case: tuple[Any, str]) -> None:
    await rejected(world, world.q.Check, *case)


@st.composite
def balance_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = quota_pb2.GetBalanceRequest(subject=common_pb2.Subject(org_id="acme"))
    kind = draw(st.sampled_from(["subject", "meters", "unknown"]))
    if kind == "subject":
        s, field = draw(bad_subject())
        r.subject.CopyFrom(s)
        return r, field, INVALID
    if kind == "meters":
        names = draw(st.lists(st.sampled_from(METERS), max_size=4))
        i = draw(st.integers(0, len(names)))
        names.insert(i, draw(UNKNOWN_METERS))
        r.meters.extend(names)
        return r, f"meters[{i}]", INVALID
    # well formed, but no such org / team / seat (documented NOT_FOUND); a seat of
    # another team is INVALID_ARGUMENT naming the team
    which = draw(st.sampled_from(["org_id", "team_id", "seat_id", "seat of t2"]))
    if which == "seat of t2":
        r.subject.team_id, r.subject.seat_id = "t2", "s1"
        return r, "subject.team_id", INVALID
    setattr(r.subject, which, "nobody-" + draw(st.text("abc", max_size=5)))
    return r, f"subject.{which}", NOT_FOUND


@SETTINGS
@given(case=balance_cases())
async def test_get_balance(world: World, case: tuple[Any, str, grpc.StatusCode]) -> None:
    await rejected(world, world.q.GetBalance, *case)


@st.composite
def watch_status_cases(draw: Any) -> tuple[Any, str]:
    if draw(st.booleans()):
        return quota_pb2.WatchStatusRequest(org_id=draw(bad_ids())), "org_id"
    # valid ids first, repeats included: the field named is the index as sent
    ids = draw(st.lists(st.sampled_from(["bot", "bot2", "x"]), max_size=4))
    ids.append(draw(bad_ids()))
    return (quota_pb2.WatchStatusRequest(org_id="acme", assistant_ids=ids),
            f"assistant_ids[{len(ids) - 1}]")


@SETTINGS
@given(case=watch_status_cases())
async def test_watch_status(world: World, case: tuple[Any, str]) -> None:
    await rejected(world, world.q.WatchStatus, *case)


# -- AdminService ------------------------------------------------------------------------
def _ids(draw: Any, request: Any, required: tuple[str, ...],
         optional: tuple[str, ...] = ()) -> tuple[Any, str]:
    name = draw(st.sampled_from(required + optional))
    setattr(request, name, draw(bad_ids(required=name in required)))
    return request, name


@st.composite
def upsert_plan_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.UpsertPlanRequest(name="review", allowances=[
        admin_pb2.Allowance(meter=m, monthly=1) for m in draw(st.lists(
            st.sampled_from(METERS), min_size=1, max_size=5, unique=True))])
    kind = draw(st.sampled_from(["name", "meter", "duplicate", "amount"]))
    if kind == "name":
        return _ids(draw, r, ("name",))
    i = draw(st.integers(0, len(r.allowances) - 1))
    if kind == "meter":
        r.allowances[i].meter = draw(UNKNOWN_METERS)
        return r, f"allowances[{i}].meter"
    if kind == "duplicate":
        r.allowances.insert(i + 1, admin_pb2.Allowance(meter=r.allowances[i].meter))
        return r, f"allowances[{i + 1}].meter"
    name = draw(st.sampled_from(["monthly", "per_seat", "one_time"]))
    setattr(r.allowances[i], name, draw(bad_amounts(allow_zero=True)))
    return r, f"allowances[{i}].{name}"


@st.composite
def upsert_org_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.UpsertOrgRequest(org_id="acme", plan="pro", seats=2)
    kind = draw(st.sampled_from(["ids", "unknown plan", "seats", "anchor"]))
    if kind == "ids":
        return _ids(draw, r, ("org_id", "plan"))
    if kind == "unknown plan":
        r.plan = draw(st.sampled_from(["nope", "Pro", "pro "]))
        return r, "plan"
    if kind == "seats":
        r.seats = draw(bad_amounts(allow_zero=True))
        return r, "seats"
    r.period_anchor_day = draw(INT32.filter(lambda d: not 0 <= d <= 28))
    return r, "period_anchor_day"


@st.composite
def upsert_team_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.UpsertTeamRequest(org_id="acme", team_id="t1", seats=1)
    kind = draw(st.sampled_from(["ids", "seats", "unknown org"]))
    if kind == "ids":
        return (*_ids(draw, r, ("org_id", "team_id")), INVALID)
    if kind == "seats":
        r.seats = draw(bad_amounts(allow_zero=True))
        return r, "seats", INVALID
    r.org_id = "no-such-org"
    return r, "org_id", NOT_FOUND


@st.composite
def upsert_seat_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="s1", team_id="t1", limits=[
        admin_pb2.SeatLimit(meter=m, monthly_limit=5) for m in draw(st.lists(
            st.sampled_from(METERS), min_size=1, max_size=5, unique=True))])
    kind = draw(st.sampled_from(["ids", "meter", "duplicate", "limit", "unknown team",
                                 "unknown org"]))
    if kind == "ids":
        return (*_ids(draw, r, ("org_id", "seat_id"), ("team_id",)), INVALID)
    if kind == "unknown team":
        r.team_id = "no-such-team"
        return r, "team_id", NOT_FOUND
    if kind == "unknown org":
        r.org_id = "no-such-org"
        return r, "org_id", NOT_FOUND
    i = draw(st.integers(0, len(r.limits) - 1))
    if kind == "meter":
        r.limits[i].meter = draw(UNKNOWN_METERS)
        return r, f"limits[{i}].meter", INVALID
    if kind == "duplicate":
        r.limits.insert(i + 1, admin_pb2.SeatLimit(meter=r.limits[i].meter, unlimited=True))
        return r, f"limits[{i + 1}].meter", INVALID
    r.limits[i].monthly_limit = draw(bad_amounts(allow_zero=True))
    return r, f"limits[{i}].monthly_limit", INVALID


@st.composite
def upsert_assistant_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.UpsertAssistantRequest(org_id="acme", assistant_id="bot", enabled=False)
    if draw(st.integers(0, 3)) == 0:
        r.team_id = "no-such-team"
        return r, "team_id", NOT_FOUND
    return (*_ids(draw, r, ("org_id", "assistant_id"), ("team_id",)), INVALID)


@st.composite
def set_feature_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.SetFeatureRequest(org_id="acme", feature="spark", enabled=False)
    if draw(st.integers(0, 3)) == 0:
        r.org_id = "no-such-org"
        return r, "org_id", NOT_FOUND
    return (*_ids(draw, r, ("org_id", "feature"), ("team_id",)), INVALID)


@st.composite
def allocation_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.SetAllocationTemplateRequest(
        org_id="acme", meter=M, mode=admin_pb2.ALLOCATION_MODE_CUSTOM, custom={"t1": 10})
    kind = draw(st.sampled_from(["ids", "meter", "mode", "per_seat", "custom team",
                                 "custom amount", "custom unknown team"]))
    if kind == "ids":
        return (*_ids(draw, r, ("org_id",)), INVALID)
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter", INVALID
    if kind == "mode":  # proto3 enums are open: any int32 arrives
        r.mode = draw(INT32.filter(lambda m: m not in (0, 1, 2, 3)))
        return r, "mode", INVALID
    if kind == "per_seat":
        r.mode, r.per_seat = admin_pb2.ALLOCATION_MODE_PER_SEAT, draw(bad_amounts(True))
        return r, "per_seat", INVALID
    if kind == "custom team":
        r.custom[draw(bad_ids())] = 1
        return r, "custom", INVALID
    if kind == "custom amount":
        r.custom["t2"] = draw(bad_amounts(allow_zero=True))
        return r, "custom[t2]", INVALID
    r.custom["no-such-team"] = 1
    return r, "custom", NOT_FOUND


@st.composite
def overage_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.SetOverageRequest(org_id="acme", meter=M, cap=10, unit_price_micros=1,
                                    bill_every_micros=10)
    kind = draw(st.sampled_from(["ids", "meter", "cap", "unit_price_micros",
                                 "bill_every_micros"]))
    if kind == "ids":
        return _ids(draw, r, ("org_id",))
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter"
    setattr(r, kind, draw(bad_amounts(allow_zero=True)))
    return r, kind


@st.composite
def auto_topup_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.SetAutoTopUpRequest(org_id="acme", meter=M, threshold=10, amount=100,
                                      enabled=True, cooldown_seconds=60, max_per_period=2)
    kind = draw(st.sampled_from(["ids", "meter", "threshold", "amount", "cooldown_seconds",
                                 "max_per_period"]))
    if kind == "ids":
        return _ids(draw, r, ("org_id",))
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter"
    if kind in ("threshold", "amount"):
        setattr(r, kind, draw(bad_amounts()))
    elif kind == "cooldown_seconds":
        r.cooldown_seconds = draw(INT32.filter(lambda s: not 0 <= s <= 366 * 86_400))
    else:
        r.max_per_period = draw(st.integers(-(2**31), -1))
    return r, kind


@st.composite
def topup_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.TopUpRequest(org_id="acme", meter=M, amount=7, purchase_id="fresh")
    kind = draw(st.sampled_from(["ids", "meter", "amount", "reused", "unknown team",
                                 "unknown seat", "seat of t2"]))
    if kind == "ids":
        return (*_ids(draw, r, ("org_id", "purchase_id"), ("team_id", "seat_id")), INVALID)
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter", INVALID
    if kind == "amount":
        r.amount = draw(bad_amounts())
        return r, "amount", INVALID
    if kind == "reused":  # p0 bought 100 at the org
        r.purchase_id = "p0"
        return r, "purchase_id", INVALID
    if kind == "unknown team":
        r.team_id = "no-such-team"
        return r, "team_id", NOT_FOUND
    if kind == "unknown seat":
        r.seat_id = "no-such-seat"
        return r, "seat_id", NOT_FOUND
    r.team_id, r.seat_id = "t2", "s1"
    return r, "team_id", INVALID


@st.composite
def transfer_cases(draw: Any) -> tuple[Any, str, grpc.StatusCode]:
    r = admin_pb2.TransferRequest(org_id="acme", meter=M, amount=1,
                                  bucket=admin_pb2.BUCKET_MONTHLY, to_team_id="t2",
                                  idempotency_key="fresh")
    kind = draw(st.sampled_from(["ids", "meter", "amount", "bucket", "same wallet",
                                 "reused key", "unknown seat"]))
    if kind == "ids":
        return (*_ids(draw, r, ("org_id", "idempotency_key"),
                      ("from_team_id", "from_seat_id", "to_team_id", "to_seat_id")), INVALID)
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter", INVALID
    if kind == "amount":
        r.amount = draw(bad_amounts())
        return r, "amount", INVALID
    if kind == "bucket":  # BUCKET_UNSPECIFIED, or any unknown value
        r.bucket = draw(INT32.filter(lambda b: b not in (1, 2)))
        return r, "bucket", INVALID
    if kind == "same wallet":
        r.from_team_id = r.to_team_id = draw(st.sampled_from(["t1", "t2"]))
        return r, "to_team_id", INVALID
    if kind == "reused key":  # x0 moved 5 to t1
        r.idempotency_key = "x0"
        return r, "idempotency_key", INVALID
    r.to_team_id, r.to_seat_id = "", "no-such-seat"
    return r, "to_seat_id", NOT_FOUND


@st.composite
def adjust_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=-2, reason="fix",
                                idempotency_key="fresh")
    kind = draw(st.sampled_from(["ids", "meter", "delta", "reason", "reused key"]))
    if kind == "ids":
        return _ids(draw, r, ("org_id", "idempotency_key"))
    if kind == "meter":
        r.meter = draw(UNKNOWN_METERS)
        return r, "meter"
    if kind == "delta":
        r.delta = draw(st.one_of(st.just(0), BIG, BIG.map(lambda n: -n),
                                 st.just(-(2**63))))
        return r, "delta"
    if kind == "reason":
        r.reason = draw(st.one_of(st.just(""), st.integers(1025, 3000).map(lambda n: "r" * n)))
        return r, "reason"
    r.idempotency_key = "a0"  # a0 added 3
    return r, "idempotency_key"


@st.composite
def list_usage_cases(draw: Any) -> tuple[Any, str]:
    r = admin_pb2.ListUsageRequest(org_id="acme", meter=M, group_by=["team"], page_size=10)
    kind = draw(st.sampled_from(["ids", "meter", "group_by", "start", "end", "range",
                                 "page_size", "page_token", "deep token"]))
    if kind == "ids":
        return _ids(draw, r, ("org_id",))
    if kind == "meter":  # empty is every meter
        r.meter = draw(UNKNOWN_METERS.filter(bool))
        return r, "meter"
    if kind == "group_by":
        dims = draw(st.lists(st.sampled_from(["seat", "team", "day", "period"]), max_size=3))
        i = draw(st.integers(0, len(dims)))
        dims.insert(i, draw(st.text(max_size=10).filter(
            lambda g: g not in ("seat", "team", "assistant", "action", "feature", "day",
                                "period"))))
        del r.group_by[:]
        r.group_by.extend(dims)
        return r, f"group_by[{i}]"
    if kind in ("start", "end"):
        getattr(r, kind).CopyFrom(draw(bad_timestamps()))
        return r, kind
    if kind == "range":
        start = draw(st.integers(0, 253_402_300_799))
        r.start.FromSeconds(start)
        r.end.FromSeconds(draw(st.integers(0, start - 1)) if start else -1)
        return r, "end"
    if kind == "page_size":
        r.page_size = draw(st.integers(-(2**31), -1))
        return r, "page_size"
    if kind == "page_token":
        r.page_token = draw(st.one_of(
            st.text(min_size=1, max_size=80),
            st.builds(lambda b: base64.urlsafe_b64encode(b).decode(),
                      st.binary(min_size=1, max_size=60)),
            st.builds(lambda o: base64.urlsafe_b64encode(json.dumps(o).encode()).decode(),
                      st.one_of(st.just({"a": ["x", "y"], "q": "0" * 16}),
                                st.just({"a": 5, "q": "x"}), st.just([1, 2]),
                                st.just(None), st.just("s"), st.just({"q": "x"})))))
        return r, "page_token"
    depth = draw(st.integers(2_000, 50_000))  # json recurses once per level
    r.page_token = base64.urlsafe_b64encode(b"[" * depth).decode()
    return r, "page_token"


@st.composite
def watch_events_cases(draw: Any) -> tuple[Any, str]:
    if draw(st.integers(0, 3)) == 0:
        return admin_pb2.WatchEventsRequest(org_id=draw(bad_ids())), "org_id"
    after = draw(st.one_of(
        st.text(min_size=1, max_size=45).filter(
            lambda c: re.fullmatch(r"[0-9]{1,20}-[0-9]{1,20}", c) is None),
        st.builds(lambda a, b: f"{a}-{b}", st.sampled_from(["\u00b2", "\u0661", "1\u00b2",
                                                            "\uff11", "", "-1", "+1", " 1"]),
                  st.sampled_from(["0", "1", "\u0661"])),
        st.builds(lambda a, b: f"{a}-{b}", st.integers(2**64, 10**20 - 1),
                  st.integers(0, 2**64 - 1)),
        st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 2**64 - 1),
                  st.integers(2**64, 10**20 - 1)),
        st.just(f"{2**64 - 1}-{2**64 - 1}"),  # the last stream id: nothing comes after
        st.integers(42, 4000).map(lambda n: "1" * (n // 2) + "-" + "1" * (n - n // 2 - 1)),
    ))
    return admin_pb2.WatchEventsRequest(org_id="acme", after=after), "after"


ADMIN_CASES: dict[str, Any] = {
    "UpsertPlan": upsert_plan_cases(), "UpsertOrg": upsert_org_cases(),
    "UpsertTeam": upsert_team_cases(), "UpsertSeat": upsert_seat_cases(),
    "UpsertAssistant": upsert_assistant_cases(), "SetFeature": set_feature_cases(),
    "SetAllocationTemplate": allocation_cases(), "SetOverage": overage_cases(),
    "SetAutoTopUp": auto_topup_cases(), "TopUp": topup_cases(),
    "Transfer": transfer_cases(), "Adjust": adjust_cases(), "ListUsage": list_usage_cases(),
    "WatchEvents": watch_events_cases(),
}


def test_every_rpc_is_covered() -> None:
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name
    quota = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].methods_by_name
    assert set(admin) == set(ADMIN_CASES)
    assert set(quota) == {"Reserve", "Commit", "Refund", "Extend", "Check", "GetBalance",
                          "WatchStatus"}  # a test each above


@pytest.mark.parametrize("rpc", sorted(ADMIN_CASES))
@SETTINGS
@given(data=st.data())
async def test_admin(world: World, rpc: str, data: Any) -> None:
    request, field, *code = data.draw(ADMIN_CASES[rpc])
    await rejected(world, getattr(world.a, rpc), request, field, *code)


# -- Envoy's ShouldRateLimit ---------------------------------------------------------------
def descriptor(hits: int | None = None, **entries: str) -> Any:
    out = ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])
    if hits is not None:
        out.hits_addend.CopyFrom(UInt64Value(value=hits))
    return out


@st.composite
def rls_cases(draw: Any) -> tuple[Any, str]:
    """A good descriptor first (it must not be charged either), then a bad one."""
    good = descriptor(org_id="acme", meter=M)
    if draw(st.integers(0, 5)) == 0:
        return rls_pb2.RateLimitRequest(domain="d"), "descriptors"
    w = "descriptors[1]"
    kind = draw(st.sampled_from(["subject", "key", "duplicate", "meter", "action",
                                 "meter+action", "hits", "feature"]))
    if kind == "subject":
        name = draw(st.sampled_from(SUBJECT_FIELDS))
        bad = descriptor(**{"org_id": "acme", name: draw(bad_ids(name == "org_id"))})
        field = f"{w}.{name}"
    elif kind == "key":
        key = draw(st.text(max_size=12).filter(lambda k: k not in (
            "org_id", "team_id", "seat_id", "assistant_id", "meter", "action", "feature")))
        bad = descriptor(org_id="acme")
        bad.entries.add(key=key, value="v")
        field = f"{w}.entries[1].key"
    elif kind == "duplicate":
        bad = descriptor(org_id="acme", meter=M)
        bad.entries.add(key="meter", value=M)
        field = f"{w}.entries[2].key"
    elif kind == "meter":
        bad, field = descriptor(org_id="acme", meter=draw(UNKNOWN_METERS.filter(bool))), \
            f"{w}.meter"
    elif kind == "action":
        bad, field = descriptor(org_id="acme", action=draw(st.sampled_from(
            ["no_such_action", "x" * 200, "ai_sequence\x00"]))), f"{w}.action"
    elif kind == "meter+action":
        bad, field = descriptor(org_id="acme", meter=M, action="ai_sequence"), f"{w}.action"
    elif kind == "hits":  # UInt64Value: past 2^63 - 1 as well
        bad = descriptor(draw(st.integers(2**50 + 1, 2**64 - 1)), org_id="acme")
        field = f"{w}.hits_addend"
    else:
        bad, field = descriptor(org_id="acme", feature=draw(bad_ids(False))), f"{w}.feature"
    return rls_pb2.RateLimitRequest(domain="d", descriptors=[good, bad], hits_addend=1), field


@SETTINGS
@given(case=rls_cases())
async def test_should_rate_limit(world: World, case: tuple[Any, str]) -> None:
    await rejected(world, world.rls.ShouldRateLimit, *case)


# -- any request at all: never a crash, and a refusal changes nothing ----------------------
FD = FieldDescriptor
_WORDS = ["", "acme", "t1", "t2", "s1", "bot", "pro", "spark", "p0", "x0", "a0", "held", "$held",
          "$done", "ai_sequence", "team", "day", *METERS]
ANY_STRING = st.one_of(st.sampled_from(_WORDS), st.text(max_size=12), bad_ids())
_EDGES = [0, 1, -1, 28, 29, 86_400, 86_401, 2**31 - 1, -(2**31)]
ANY_INT32 = st.one_of(st.sampled_from(_EDGES), INT32)
ANY_INT64 = st.one_of(st.sampled_from([*_EDGES, 2**50, 2**50 + 1, 2**63 - 1, -(2**63)]),
                      st.integers(-(2**63), 2**63 - 1))
ANY_TIMESTAMP = st.one_of(
    bad_timestamps(), st.builds(lambda s, n: Timestamp(seconds=s, nanos=n),
                                st.integers(-62_135_596_800, 253_402_300_799),
                                st.integers(0, 999_999_999)))


def _scalar(f: Any) -> st.SearchStrategy[Any]:
    if f.type == FD.TYPE_STRING:
        return ANY_STRING
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_ENUM:
        return st.integers(-2, 5)
    if f.type == FD.TYPE_INT64:
        return ANY_INT64
    assert f.type == FD.TYPE_INT32, f.full_name
    return ANY_INT32


@st.composite
def any_message(draw: Any, cls: Any) -> Any:
    """A message of `cls` with any subset of its fields set to anything the wire allows."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if is_map:
            kv = f.message_type.fields_by_name
            getattr(msg, f.name).update(draw(st.dictionaries(
                _scalar(kv["key"]), _scalar(kv["value"]), max_size=3)))
        elif f.type == FD.TYPE_MESSAGE:
            sub = _message_class(f)
            values = draw(st.lists(sub, max_size=3)) if _repeated(f) else [draw(sub)]
            for v in values:
                (getattr(msg, f.name).add() if _repeated(f) else getattr(msg, f.name)).CopyFrom(v)
        elif _repeated(f):
            getattr(msg, f.name).extend(draw(st.lists(_scalar(f), max_size=3)))
        else:
            setattr(msg, f.name, draw(_scalar(f)))
    return msg


def _repeated(f: Any) -> bool:
    return bool(f.is_repeated)


def _message_class(f: Any) -> st.SearchStrategy[Any]:
    if f.message_type.full_name == "google.protobuf.Timestamp":
        return ANY_TIMESTAMP
    return any_message(GetMessageClass(f.message_type))


UNARY = {
    **{m: quota_pb2 for m in ("Reserve", "Commit", "Refund", "Extend", "Check", "GetBalance")},
    **{m: admin_pb2 for m in ADMIN_CASES if m != "WatchEvents"}}


@pytest.mark.parametrize("rpc", sorted(UNARY))
@settings(SETTINGS, max_examples=30)
@given(data=st.data())
async def test_any_request(world: World, rpc: str, data: Any) -> None:
    """Whatever the fields hold: no UNKNOWN or INTERNAL (nor UNAVAILABLE: Redis and SQL are
    up), and an INVALID_ARGUMENT names a field of the request and changes nothing."""
    request = data.draw(any_message(getattr(UNARY[rpc], f"{rpc}Request")))
    if getattr(request, "reservation_id", "") in ("$held", "$done"):
        request.reservation_id = world.held if request.reservation_id == "$held" else world.done
    before = await snapshot(world.redis)
    stub = world.q if UNARY[rpc] is quota_pb2 else world.a
    err = await answer(getattr(stub, rpc), request)
    if err is None:
        return
    assert err.code() not in (*CRASH, grpc.StatusCode.UNAVAILABLE), \
        f"{err.code()} {err.details()}: {request}"
    if err.code() is INVALID:
        field = violation(err)
        assert re.split(r"[.\[]", field)[0] in request.DESCRIPTOR.fields_by_name, field
        assert await snapshot(world.redis) == before, f"changed Redis: {request}"


# -- the bugs this review found, one example each ------------------------------------------
HEX = "0123456789abcdef" * 2


Case = Callable[[World], tuple[Callable[[Any], Any], Any, str]]
REGRESSIONS: dict[str, Case] = {
    # Commit took labels of any size (Reserve refuses more than 4,096 bytes) and
    # committed the hold
    "commit-labels": lambda w: (w.q.Commit, quota_pb2.CommitRequest(
        reservation_id=w.held, labels={"k": "v" * 5000}), "labels"),
    # the index of a bad assistant id was counted after removing repeats
    "watch-status-index": lambda w: (w.q.WatchStatus, quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot", "bot", "x\x00"]), "assistant_ids[2]"),
    # a deeply nested page token: RecursionError, answered INTERNAL
    "deep-page-token": lambda w: (w.a.ListUsage, admin_pb2.ListUsageRequest(
        org_id="acme", page_token=base64.urlsafe_b64encode(b"[" * 100_000).decode()),
        "page_token"),
}
# "$" in the id patterns matches before a final newline: NOT_FOUND for the first, and
# the second was answered as a fail-open hold (COMMITTED, REFUNDED, GRANTED)
for _rid in (f"r1.{HEX}\n", f"open.{HEX}\n"):
    for _rpc, _req in (("Commit", quota_pb2.CommitRequest), ("Refund", quota_pb2.RefundRequest),
                       ("Extend", quota_pb2.ExtendRequest)):
        REGRESSIONS[f"{_rpc}-{_rid[:4]}-newline"] = (
            lambda w, rpc=_rpc, req=_req, rid=_rid: (getattr(w.q, rpc), req(reservation_id=rid),
                                                     "reservation_id"))
# UNKNOWN (int("²"), Redis refusing the id) or INTERNAL (a non-ASCII cursor echoed in
# the initial metadata)
# and a cursor from the future (year 5138): every live event would be dropped as sent
for _after in ("\u00b2-1", "\u0661-1", "99999999999999999999-0", "1-99999999999999999999",
               f"{2**64 - 1}-{2**64 - 1}", "99999999999999-0"):
    REGRESSIONS[f"after-{_after[:8]}-{len(_after)}"] = lambda w, after=_after: (
        w.a.WatchEvents, admin_pb2.WatchEventsRequest(org_id="acme", after=after), "after")


def _list_usage(name: str, ts: Timestamp) -> Any:
    req = admin_pb2.ListUsageRequest(org_id="acme")
    getattr(req, name).CopyFrom(ts)
    return req


# a Timestamp out of its range: ValueError, answered INTERNAL
for _name, _ts in (("start", Timestamp(seconds=2**62)), ("end", Timestamp(seconds=-(2**40))),
                   ("start", Timestamp(seconds=1, nanos=-1)),
                   ("end", Timestamp(seconds=1, nanos=10**9))):
    REGRESSIONS[f"{_name}-{_ts.seconds}-{_ts.nanos}"] = lambda w, n=_name, t=_ts: (
        w.a.ListUsage, _list_usage(n, t), n)


@pytest.mark.parametrize("name", list(REGRESSIONS))
async def test_regression(world: World, name: str) -> None:
    await rejected(world, *REGRESSIONS[name](world))


async def test_transfer_to_the_same_seat_names_the_seat(world: World) -> None:
    await rejected(world, world.a.Transfer, admin_pb2.TransferRequest(
        org_id="acme", meter=M, amount=1, bucket=admin_pb2.BUCKET_MONTHLY,
        from_seat_id="s1", to_seat_id="s1", idempotency_key="k"), "to_seat_id")


# -- undecodable requests ------------------------------------------------------------------
def _len_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize(("method", "raw", "field"), [
    # CheckRequest.subject.org_id not UTF-8
    ("QuotaService/Check", _len_field(1, _len_field(1, b"\xff\xfe")), "subject.org_id"),
    ("QuotaService/Check", _len_field(2, b"\xc3("), "meter"),  # CheckRequest.meter
    ("QuotaService/Check", b"\xff\xff\xff", "request"),  # not protobuf at all
    # ReserveRequest.charges[1].meter (the first charge is fine)
    ("QuotaService/Reserve", _len_field(2, _len_field(1, b"message_tokens"))
     + _len_field(2, _len_field(1, b"\xe2\x82")), "charges[1].meter"),
    # CommitRequest.labels: a map entry's value
    ("QuotaService/Commit", _len_field(1, b"r1.00") + _len_field(
        3, _len_field(1, b"k") + _len_field(2, b"\xff")), "labels.value"),
    ("AdminService/TopUp", _len_field(1, b"\x80"), "org_id"),
    ("envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
     _len_field(1, b"\xc0\xaf"), "domain"),
])
async def test_undecodable_request_is_invalid_argument(world: World, method: str, raw: bytes,
                                                       field: str) -> None:
    """A request that does not decode (a string that is not UTF-8, bytes that are not a
    message) is INVALID_ARGUMENT naming the field, like any bad input; and the server
    goes on serving."""
    path = method if method.startswith("envoy") else f"quotagate.v1.{method}"
    call = world.channel.unary_unary(f"/{path}", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
    before = await snapshot(world.redis)
    err = await answer(call, raw)
    assert err is not None and err.code() is INVALID, err
    assert violation(err) == field
    assert await snapshot(world.redis) == before
    ok = await world.q.Check(quota_pb2.CheckRequest(
        subject=common_pb2.Subject(org_id="acme"), meter=M))
    assert ok.active


async def test_undecodable_stream_request_is_invalid_argument(world: World) -> None:
    call = world.channel.unary_stream("/quotagate.v1.QuotaService/WatchStatus",
                                      request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in call(_len_field(1, b"\xff")):
            pass
    assert e.value.code() is INVALID
    assert violation(e.value) == "org_id"


@pytest.mark.parametrize("rpc", ["commit", "refund", "extend"])
async def test_ledger_api_refuses_a_reservation_id_with_a_trailing_newline(
        server: Grpc, rpc: str) -> None:
    """The Python API (Ledger, under the servicers) refuses it as well: `$` in the id
    pattern matched before a final newline."""
    from quotagate.errors import InvalidArgument

    ledger = server.app.ledger
    assert ledger is not None
    with pytest.raises(InvalidArgument) as e:
        await getattr(ledger, rpc)("r1." + "0" * 32 + "\n")
    assert e.value.field == "reservation_id"
