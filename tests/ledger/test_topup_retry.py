"""TopUp is idempotent on its purchase id as the billing system sent it: a retry after the
seat moved to another team is the same purchase (applied once), and a different top-up
under a used purchase id is refused, changing nothing. Real scripts on real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from quotagate.errors import InvalidArgument
from quotagate.ledger.model import Allowance
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def _org(ledger: Ledger) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "p", seats=4)
    for t in ("t1", "t2"):
        await ledger.upsert_team("o", t, 2)
    await ledger.upsert_seat("o", "s1", "t1")


async def _dump(redis: Any) -> dict[bytes, Any]:
    return {k: await redis.dump(k) for k in sorted(await redis.keys("*"))
            if b"ledger" not in k and b"events" not in k}


@pytest.mark.parametrize("retry_team", ["", "t1"])
async def test_a_seat_top_up_retried_after_the_seat_moved_applies_once(
        ledger: Ledger, redis: Any, retry_team: str) -> None:
    await _org(ledger)
    first = await ledger.topup("o", M, 300, "pur-1", seat_id="s1")
    assert first.applied and first.balance.topup_remaining == 300
    await ledger.upsert_seat("o", "s1", "t2")  # the seat moves before the retry arrives
    again = await ledger.topup("o", M, 300, "pur-1", team_id=retry_team, seat_id="s1")
    assert not again.applied
    assert again.balance.topup_remaining == 300  # the seat's tokens, once


async def test_a_team_top_up_retried_is_applied_once(ledger: Ledger) -> None:
    await _org(ledger)
    assert (await ledger.topup("o", M, 50, "pur-t", team_id="t2")).applied
    assert not (await ledger.topup("o", M, 50, "pur-t", team_id="t2")).applied


@pytest.mark.parametrize("other", [
    {"amount": 301, "seat_id": "s1"},  # another amount
    {"amount": 300},  # the org wallet, not the seat
    {"amount": 300, "team_id": "t1"},  # the team, not the seat
    {"amount": 300, "seat_id": "s1", "team_id": "t2"},  # a team the purchase did not name
])
async def test_another_top_up_under_a_used_purchase_id_changes_nothing(
        ledger: Ledger, redis: Any, other: dict[str, Any]) -> None:
    await _org(ledger)
    await ledger.topup("o", M, 300, "pur-1", seat_id="s1")
    before = await _dump(redis)
    amount = other.pop("amount")
    with pytest.raises(InvalidArgument) as e:
        await ledger.topup("o", M, amount, "pur-1", **other)
    assert e.value.field == "purchase_id"
    assert await _dump(redis) == before


async def test_a_team_purchase_id_does_not_answer_an_org_top_up(ledger: Ledger) -> None:
    await _org(ledger)
    await ledger.topup("o", M, 50, "pur-t", team_id="t1")
    with pytest.raises(InvalidArgument):
        await ledger.topup("o", M, 50, "pur-t")
