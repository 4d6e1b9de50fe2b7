"""ledger/wallet.py reads and writes wallets exactly as lib.lua does (MessagePack of the
twelve counters), and reads the forms earlier builds wrote."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from quotagate.ledger import wallet

#: the first counter is the period id: 0 for a gauge meter, year × 12 + month for a
#: counter (23,640 in 1970), so a MessagePack wallet never starts like a text one
PERIODS = st.just(0) | st.integers(1970 * 12, 9999 * 12)
COUNTERS = st.tuples(PERIODS, st.lists(st.integers(-(2**52), 2**52), min_size=11,
                                       max_size=11)).map(lambda t: [t[0], *t[1]])
EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**50, 2**52,
         -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**50)]


async def test_the_same_bytes_as_the_scripts(redis: Any) -> None:
    """encode() writes what cmsgpack.pack writes in Redis, and decode() reads it back."""
    for start in range(0, len(EDGES), 11):
        ints = [24323, *(EDGES[start:start + 11] + [7] * 11)[:11]]
        lua = await redis.eval("return cmsgpack.pack(" + ",".join(map(str, ints)) + ")", 0)
        assert wallet.encode(ints) == lua
        assert wallet.decode(lua) == ints
        back = await redis.eval(
            "local t = {cmsgpack.unpack(ARGV[1])} for i = 1, #t do "
            "t[i] = string.format('%d', t[i]) end return t", 0, wallet.encode(ints))
        assert [int(x) for x in back] == ints


@settings(max_examples=300)
@given(COUNTERS)
def test_round_trip_in_every_form(ints: list[int]) -> None:
    assert wallet.decode(wallet.encode(ints)) == ints
    assert wallet.decode("[" + ",".join(map(str, ints)) + "]") == ints
    assert wallet.decode(",".join(map(str, ints))) == ints
    assert wallet.text(wallet.encode(ints)) == "[" + ",".join(map(str, ints)) + "]"


def test_not_a_wallet() -> None:
    for junk in (b"", b"garbage", b"[1,2]", b"1,2,3", wallet.encode([1] * 12)[:-1], b"\xc1"):
        assert wallet.decode(junk) is None
    assert wallet.is_wallet("w") and wallet.is_wallet("S:s%201:w")
    assert not wallet.is_wallet("d") and not wallet.is_wallet("ev")
