"""(e) AdminService.ListUsage through the real gRPC server, read from SQL, against sums the
test computes itself from what Commit and Refund answered."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import DAY, T0, Grpc
from quotagate.clock import ManualClock
from quotagate.ledger.model import Allowance, Charge, HoldState, Subject
from quotagate.v1 import admin_pb2

from .conftest import app_syncer
from .workload import METERS

ORG = "list:usage org"
TEAMS = {"": ["", "solo"], "red": ["r1", "r 2"], "blue": ["b1"]}
ASSISTANTS = {"": [""], "red": ["", "bot:r"], "blue": ["", "bot-b"]}
DIMS = ("seat", "team", "assistant", "action", "feature", "day", "period")

Record = dict[str, str]


async def _workload(s: Grpc, clock: ManualClock) -> list[tuple[Record, str, int]]:
    """Reserve/Commit/Refund over three days; returns (group values, meter, ±amount) as
    the answers of Commit and Refund report them."""
    led = s.app.ledger
    assert led is not None
    await led.upsert_plan("big", [Allowance(m, 10**9) for m in METERS])
    await led.upsert_org(ORG, "big")
    for team, seats in TEAMS.items():
        if team:
            await led.upsert_team(ORG, team)
        for seat in seats:
            if seat:
                await led.upsert_seat(ORG, seat, team)
        for a in ASSISTANTS[team]:
            if a:
                await led.upsert_assistant(ORG, a, team)
    rng = random.Random(5)
    out: list[tuple[Record, str, int]] = []
    for i in range(360):
        if i and i % 120 == 0:
            clock.advance(DAY)
        clock.advance(rng.randint(1_000, 200_000))
        team = rng.choice(list(TEAMS))
        seat = rng.choice(TEAMS[team])
        assistant = rng.choice(ASSISTANTS[team]) if not seat else ""
        subject = Subject(ORG, team, seat, assistant)
        action = rng.choice(("", "", "ai_sequence", "ai_icebreaker"))
        feature = rng.choice(("", "chat", "spark"))
        if action:
            res = await led.reserve(subject, action=action, feature=feature,
                                    idempotency_key=f"u{i}")
        else:
            res = await led.reserve(subject, [Charge(m, rng.randint(1, 900))
                                              for m in rng.sample(METERS, rng.choice((1, 2)))],
                                    feature=feature, idempotency_key=f"u{i}")
        day = dt.datetime.fromtimestamp(clock.now_ms() / 1000, dt.UTC).strftime("%Y-%m-%d")
        group = {"seat": seat, "team": team, "assistant": assistant, "action": action,
                 "feature": feature, "day": day, "period": "2026-11-01"}  # anchor day 1
        if rng.random() < 0.15:
            await led.refund(res.reservation_id)  # released: never usage
            continue
        actual = [] if rng.random() < 0.5 else [Charge(c.meter, rng.randint(0, 2 * c.amount))
                                                 for c in res.granted]
        c = await led.commit(res.reservation_id, actual)
        assert c.state == HoldState.COMMITTED
        out += [(group, ch.meter, ch.amount) for ch in c.amounts if ch.amount]
        if rng.random() < 0.3:
            r = await led.refund(res.reservation_id, [Charge(
                c.amounts[0].meter, rng.randint(1, 200))], reason="partial")
            out += [(group, ch.meter, -ch.amount) for ch in r.amounts if ch.amount]
    return out


def _expected(records: list[tuple[Record, str, int]], group_by: list[str],
              keep: Any = None) -> dict[tuple[tuple[str, ...], str], int]:
    out: dict[tuple[tuple[str, ...], str], int] = defaultdict(int)
    for group, meter, amount in records:
        if keep is None or keep(group, meter):
            out[(tuple(group[g] for g in group_by), meter)] += amount
    return dict(out)


async def _list(s: Grpc, group_by: list[str], page_size: int = 1000,
                **kw: Any) -> tuple[dict[tuple[tuple[str, ...], str], int], int]:
    got: dict[tuple[tuple[str, ...], str], int] = {}
    token, pages = "", 0
    while True:
        resp = await s.admin.ListUsage(admin_pb2.ListUsageRequest(
            org_id=ORG, group_by=group_by, page_size=page_size, page_token=token, **kw))
        pages += 1
        for row in resp.rows:
            assert set(row.group) == set(group_by)
            key = (tuple(row.group[g] for g in group_by), row.meter)
            assert key not in got, "a row came twice"
            got[key] = row.amount
        token = resp.next_page_token
        if not token:
            return got, pages


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


async def test_list_usage_grouped_each_way_equals_independent_sums(
        server: Grpc, clock: ManualClock) -> None:
    records = await _workload(server, clock)
    assert server.app.sink is not None
    await app_syncer(server.app).run_once()

    groupings: list[list[str]] = [[]] + [[d] for d in DIMS] + [["team", "day"],
                                                             ["seat", "assistant"], list(DIMS)]
    for group_by in groupings:
        got, _ = await _list(server, group_by)
        assert got == _expected(records, group_by), group_by

    # one meter; a day-aligned range (per-day totals) and an unaligned one (entries)
    got, _ = await _list(server, ["team"], meter="call_seconds")
    assert got == _expected(records, ["team"], lambda g, m: m == "call_seconds")
    day1 = dt.datetime.fromtimestamp((T0 + DAY) / 1000, dt.UTC).strftime("%Y-%m-%d")
    got, _ = await _list(server, ["seat"], start=_ts(T0 + DAY), end=_ts(T0 + 2 * DAY))
    assert got == _expected(records, ["seat"], lambda g, m: g["day"] == day1)
    assert got
    for group_by in (["period", "seat"], ["day", "period"]):
        for start, end in ((T0 + DAY, T0 + 2 * DAY), (T0 + DAY - 1, T0 + 2 * DAY - 1)):
            got, _ = await _list(server, group_by, start=_ts(start), end=_ts(end))
            assert got == _expected(records, group_by, lambda g, m: g["day"] == day1)

    # pagination: small pages cover every row exactly once
    full, _ = await _list(server, list(DIMS))
    paged, pages = await _list(server, list(DIMS), page_size=7)
    assert paged == full and pages == -(-len(full) // 7) and pages > 3


async def test_list_usage_time_range_not_day_aligned(server: Grpc, clock: ManualClock) -> None:
    led = server.app.ledger
    assert led is not None
    await led.upsert_plan("big", [Allowance(m, 10**6) for m in METERS])
    await led.upsert_org(ORG, "big")
    amounts = []
    for i in range(6):  # one commit an hour
        res = await led.reserve(Subject(ORG), [Charge("message_tokens", 10 + i)],
                                idempotency_key=f"h{i}")
        await led.commit(res.reservation_id)
        amounts.append(10 + i)
        clock.advance(3_600_000)
    await app_syncer(server.app).run_once()
    got, _ = await _list(server, [], start=_ts(T0 + 3_600_000 + 1), end=_ts(T0 + 4 * 3_600_000))
    assert got == {((), "message_tokens"): sum(amounts[2:4])}
    got, _ = await _list(server, [], start=_ts(T0 + 3_600_000))
    assert got == {((), "message_tokens"): sum(amounts[1:])}


def _violation(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


@pytest.mark.parametrize(("request_kw", "field"), [
    ({"group_by": ["team", "bogus"]}, "group_by[1]"),
    ({"org_id": ""}, "org_id"),
    ({"meter": "no_such_meter"}, "meter"),
    ({"page_size": -1}, "page_size"),
    ({"page_token": "garbage"}, "page_token"),
    ({"start": _ts(T0 + DAY), "end": _ts(T0)}, "end"),
])
async def test_list_usage_bad_input(server: Grpc, request_kw: dict[str, Any],
                                    field: str) -> None:
    req = {"org_id": ORG, **request_kw}
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await server.admin.ListUsage(admin_pb2.ListUsageRequest(**req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation(e.value) == field


async def test_page_token_of_another_query_is_refused(server: Grpc, clock: ManualClock) -> None:
    records = await _workload(server, clock)
    assert records
    await app_syncer(server.app).run_once()
    first = await server.admin.ListUsage(admin_pb2.ListUsageRequest(
        org_id=ORG, group_by=["seat"], page_size=1))
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await server.admin.ListUsage(admin_pb2.ListUsageRequest(
            org_id=ORG, group_by=["team"], page_size=1, page_token=first.next_page_token))
    assert _violation(e.value) == "page_token"

