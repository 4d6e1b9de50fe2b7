"""What a hold and a ledger entry store: nothing the scripts can derive (reservation id,
shard prefix, configuration and balance keys) and no empty ids in a hold; the spend path's
ledger entries as one packed field. So each Reserve and Commit writes fewer bytes (and
fewer fields) to Redis, its AOF and its replicas. Holds, wallets and ledger entries
written by earlier versions must still resolve exactly once with exact balances."""

from __future__ import annotations

from typing import Any

import pytest

from quotagate.clock import ManualClock
from quotagate.ledger import wallet
from quotagate.ledger.model import Charge, Decision, HoldState, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.sink import SPEND_FIELDS, entry_fields, entry_of

M = "message_tokens"


def text(d: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in d.items()}


async def entries(redis: Any, led: Ledger, org: str, rid: str) -> list[dict[str, str]]:
    """The reservation's ledger entries as the syncer reads them."""
    stream = led.keys.ledger(led.keys.shard_of(org))
    out = [entry_fields(f) for _, f in await redis.xrange(stream)]
    return [e for e in out if e.get("rid") == rid]


async def test_a_hold_keeps_only_what_cannot_be_derived(redis: Any, ledger: Ledger) -> None:
    await ledger.upsert_org("o", "pro")
    r = await ledger.reserve(Subject("o"), [Charge(M, 100)], idempotency_key="k1")
    assert r.decision is Decision.GRANTED
    hold = text(await redis.hgetall(ledger.keys.hold(r.reservation_id)))
    assert set(hold) == {"st", "o", "n", "exp", "at", "m1", "k1", "g1", "t1", "hp1"}
    assert hold["st"] == "H" and hold["o"] == "o" and hold["g1"] == "100"
    await ledger.commit(r.reservation_id, [Charge(M, 60)])

    # the spend path's entries are one field each, the values alone, in SPEND_FIELDS order
    stream = ledger.keys.ledger(ledger.keys.shard_of("o"))
    rid = r.reservation_id.encode()
    raw = [f for _, f in await redis.xrange(stream) if rid in f.get(b"p", b"")]
    assert len(raw) == 2 and all(set(f) == {b"p"} for f in raw)
    values = raw[1][b"p"].decode().split("\n")
    assert len(values) == len(SPEND_FIELDS)
    assert dict(zip(SPEND_FIELDS, values, strict=True))["type"] == "commit"
    assert b"assistant" not in raw[1][b"p"]  # no field names
    # no team, seat, assistant, action, feature or labels: the syncer stores them as ''
    for e in await entries(redis, ledger, "o", r.reservation_id):
        assert not {"team", "seat", "assistant", "action", "feature", "labels"} & set(e)
        assert "late" not in e
        row = entry_of(0, "1-0", e)
        assert (row.org, row.team, row.seat, row.assistant, row.action, row.feature) == \
            ("o", "", "", "", "", "")
    (b,) = await ledger.get_balance(Subject("o"), [M])
    assert b.used == 60 and b.reserved == 0


async def test_ids_and_labels_that_are_given_are_kept(redis: Any, ledger: Ledger) -> None:
    await ledger.upsert_org("o", "pro")
    await ledger.upsert_team("o", "t 1")
    await ledger.upsert_seat("o", "s/1", "t 1")
    s = Subject("o", "t 1", "s/1")
    r = await ledger.reserve(s, [Charge(M, 100)], idempotency_key="k1",
                             feature="chat", labels={"conv": "c1"})
    hold = text(await redis.hgetall(ledger.keys.hold(r.reservation_id)))
    assert hold["te"] == "t%201" and hold["se"] == "s%2F1" and hold["feat"] == "chat"
    assert hold["lbl"] == '{"conv":"c1"}' and "ae" not in hold and "act" not in hold
    await ledger.commit(r.reservation_id)
    (reserve, commit) = await entries(redis, ledger, "o", r.reservation_id)
    for e in (reserve, commit):
        row = entry_of(0, "1-0", e)
        assert (row.team, row.seat, row.feature) == ("t 1", "s/1", "chat")
        assert e["labels"] == '{"conv":"c1"}'


async def earlier_layout(redis: Any, led: Ledger, rid: str, org: str) -> None:
    """Rewrite a hold as versions before this layout stored it."""
    k = led.keys
    pre = k.org_prefix(org)
    await redis.hset(k.hold(rid), mapping={
        "rid": rid, "cfg": k.cfg(org), "pre": pre, "b1": k.bal(org, M), "te": "", "se": "",
        "ae": "", "act": "", "feat": "", "lbl": "{}"})


@pytest.mark.parametrize("op", ["commit", "refund", "extend", "expire", "late_commit"])
async def test_holds_of_the_earlier_layout_still_resolve(
        redis: Any, ledger: Ledger, clock: ManualClock, op: str) -> None:
    await ledger.upsert_org("o", "pro")
    r = await ledger.reserve(Subject("o"), [Charge(M, 100)], idempotency_key="k1",
                             ttl_seconds=60)
    await earlier_layout(redis, ledger, r.reservation_id, "o")
    (before,) = await ledger.get_balance(Subject("o"), [M])
    assert before.reserved == 100
    used, reserved = 0, 0
    if op == "commit":
        res = await ledger.commit(r.reservation_id, [Charge(M, 70)])
        assert res.state is HoldState.COMMITTED
        used = 70
    elif op == "refund":
        res = await ledger.refund(r.reservation_id)
        assert res.state is HoldState.REFUNDED
    elif op == "extend":
        ext = await ledger.extend(r.reservation_id, [Charge(M, 50)])
        assert ext.decision is Decision.GRANTED
        reserved = 150
    else:
        clock.advance(61_000)
        await ledger.sweep(ledger.keys.shard_of("o"))
        state = await redis.hget(ledger.keys.hold(r.reservation_id), "st")
        assert state == b"E"
        if op == "late_commit":  # usage after expiry is still charged, once
            res = await ledger.commit(r.reservation_id, [Charge(M, 30)])
            assert res.state is HoldState.COMMITTED
            used = 30
    (after,) = await ledger.get_balance(Subject("o"), [M])
    assert (after.used, after.reserved) == (used, reserved)
    assert after.remaining == before.remaining + before.reserved - used - reserved
    # a repeat answers the first result and charges nothing more
    if op in ("commit", "late_commit"):
        again = await ledger.commit(r.reservation_id, [Charge(M, 99)])
        assert again.state is HoldState.COMMITTED
        (same,) = await ledger.get_balance(Subject("o"), [M])
        assert same.used == used


EARLIER_WALLETS = {
    "comma": lambda ints: ",".join(map(str, ints)),
    "json": lambda ints: "[" + ",".join(map(str, ints)) + "]",
}


@pytest.mark.parametrize("form", sorted(EARLIER_WALLETS))
async def test_wallets_of_earlier_layouts_still_spend_exactly(
        redis: Any, ledger: Ledger, form: str) -> None:
    """Earlier builds wrote a wallet's integers comma-separated, then as a JSON array;
    this one writes MessagePack. Wallets in either earlier form spend exactly."""
    await ledger.upsert_org("o", "pro")
    await ledger.upsert_team("o", "t")
    await ledger.upsert_seat("o", "s", "t")
    s = Subject("o", "t", "s")
    await ledger.transfer("o", M, 500, "monthly", to_team_id="t", idempotency_key="x1")
    await ledger.transfer("o", M, 200, "monthly", from_team_id="t", to_seat_id="s",
                          idempotency_key="x2")
    r = await ledger.reserve(s, [Charge(M, 300)], idempotency_key="k1")
    (before,) = await ledger.get_balance(s, [M])
    bal = ledger.keys.bal("o", M)
    stored = {f.decode(): v for f, v in (await redis.hgetall(bal)).items()
              if wallet.is_wallet(f.decode())}
    assert set(stored) == {"w", "T:t:w", "S:s:w"}
    ints = {f: wallet.decode(v) for f, v in stored.items()}
    assert all(v is not None and wallet.encode(v) == stored[f] for f, v in ints.items())
    await redis.hset(bal, mapping={f: EARLIER_WALLETS[form](v) for f, v in ints.items()})

    (same,) = await ledger.get_balance(s, [M])
    assert same == before
    res = await ledger.commit(r.reservation_id, [Charge(M, 250)])
    assert res.amounts == (Charge(M, 250),)
    (after,) = await ledger.get_balance(s, [M])
    assert (after.used, after.reserved) == (before.used + 250, before.reserved - 300)
    assert after.remaining == before.remaining + 50
    # the wallets the commit changed (seat and team paid for it) are written back as
    # MessagePack; the org wallet it did not touch stays as it was
    now = await redis.hgetall(bal)
    assert now[b"S:s:w"] == wallet.encode(wallet.decode(now[b"S:s:w"]) or [])
    assert now[b"T:t:w"] == wallet.encode(wallet.decode(now[b"T:t:w"]) or [])
    assert now[b"w"].decode() == EARLIER_WALLETS[form](ints["w"])


def test_entries_of_every_form_make_the_same_row() -> None:
    """A spend-path entry as this build writes it (its values in one field), and the same
    entry as earlier builds wrote it (names and values in one field; a field each), are
    the same row for the syncer."""
    one = {"type": "commit", "rid": "r1.ab", "org": "o%20x", "team": "", "seat": "s",
           "assistant": "", "meter": M, "amount": "70", "takes": "Om:5:70", "late": "",
           "action": "", "feature": "chat", "labels": '{"a":"b\\nc"}', "at": "1700000000000",
           "anchor": "15"}
    assert tuple(one) == SPEND_FIELDS
    values = {b"p": "\n".join(one.values()).encode()}
    packed = {b"e": "\n".join(x for kv in one.items() for x in kv).encode()}
    fields = {k.encode(): v.encode() for k, v in one.items() if v}
    assert entry_of(3, b"1-0", values) == entry_of(3, b"1-0", packed) == \
        entry_of(3, b"1-0", fields)
    row = entry_of(3, b"1-0", packed)
    assert (row.org, row.seat, row.team, row.amount, row.feature) == ("o x", "s", "", 70,
                                                                      "chat")
    assert row.anchor == 15
    # the builds before the anchor day was written: fourteen values, the anchor unknown
    older = entry_of(3, b"1-0", {b"p": "\n".join(list(one.values())[:-1]).encode()})
    assert (older.org, older.amount, older.at_ms, older.anchor) == ("o x", 70,
                                                                    1700000000000, 0)
