"""Key layout: one hash tag per org, escaping that never collides or leaks."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from quotagate.ledger.keys import Keys, escape, unescape
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.store import Ledger

ids = st.text(min_size=1, max_size=40)


@given(ids, ids)
def test_escape_is_injective_and_reversible(a: str, b: str) -> None:
    assert unescape(escape(a)) == a
    if a != b:
        assert escape(a) != escape(b)
    assert not any(c in escape(a) for c in ":{} \n") and escape(a).isascii()


@given(ids)
def test_every_key_of_an_org_shares_its_hash_tag(org: str) -> None:
    k = Keys(256)
    tag = f"{{{k.shard_of(org)}}}"
    rid = k.reservation_id(org, "0" * 32)
    for key in (k.cfg(org), k.bal(org, "message_tokens"), k.idem(org, "x:{y}"),
                k.purchases(org), k.hold(rid), k.ledger(k.shard_of(org))):
        # Redis Cluster hashes the first {...} of a key: it must be the shard's tag.
        first = key[key.index("{"):key.index("}") + 1]
        assert first == tag


async def test_tricky_ids_stay_distinct_through_the_scripts(ledger: Ledger, redis: Any) -> None:
    tricky = ["a:b", "a%3Ab", "a", "a b", "{a}", "a}{", "élan", "ä" * 60, "a:b:", "x\u2028y"]
    for i, org in enumerate(tricky):
        await ledger.upsert_org(org, "pro")
        await ledger.upsert_team(org, "t:1")
        await ledger.upsert_seat(org, "s{1}", "t:1")
        r = await ledger.reserve(Subject(org, "t:1", "s{1}"), [Charge("message_tokens", i + 1)],
                                 idempotency_key="same:key")
        assert r.decision is Decision.GRANTED
    for i, org in enumerate(tricky):
        (b,) = await ledger.get_balance(Subject(org), ["message_tokens"])
        assert b.reserved == i + 1, org
    # Nothing escaped an org's shard: every key carries exactly one hash tag.
    async for key in redis.scan_iter("qg:{*"):
        assert key.decode().count("{") == 1


async def test_plan_allowances_are_per_meter(ledger: Ledger) -> None:
    await ledger.upsert_plan("two", [Allowance("message_tokens", 10),
                                     Allowance("call_seconds", 5)])
    await ledger.upsert_org("o", "two")
    got = {b.meter: b.total for b in await ledger.get_balance(Subject("o"))}
    assert got["message_tokens"] == 10 and got["call_seconds"] == 5 and got["storage_bytes"] == 0


def test_reservation_tokens_are_unique_and_not_shared_with_a_fork() -> None:
    import os

    from quotagate.ledger.store import TOKENS

    seen = {TOKENS.next() for _ in range(2_000)}  # several refills of the buffer
    assert len(seen) == 2_000
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in seen)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws from its own randomness, not the parent's buffer
        os.write(w, TOKENS.next().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    assert child not in seen and child != TOKENS.next()
