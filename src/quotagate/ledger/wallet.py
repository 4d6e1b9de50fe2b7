"""A wallet as lib.lua stores it: one field of an org's balance hash (``w``,
``T:<team>:w``, ``S:<seat>:w``) holding twelve integers (FIELDS) as MessagePack, the
encoding of cmsgpack.pack of twelve numbers (1 to 9 bytes each). Earlier builds wrote a
JSON array ``[p,mg,…]`` or the integers comma-separated; all three are read.

Snapshots in SQL keep the JSON array (``text``), so they stay readable; ``quotagate
restore`` writes MessagePack back (``encode``). The first value is the period id: 0 for
a gauge meter, above 23,000 for a counter (year × 12 + month), so a MessagePack wallet
never starts with ``[``, ``-`` or a digit and the three forms cannot be confused.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

#: the counters, in lib.lua's WF order
FIELDS = ("p", "mg", "mu", "mh", "tb", "th", "tu", "cu", "ch", "mx", "ou", "oh")

_UNPACK = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
           0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q", 0xca: ">f", 0xcb: ">d"}


def is_wallet(field: str) -> bool:
    """A balance hash's field that holds a wallet."""
    return field == "w" or field.endswith(":w")


def _msgpack_ints(data: bytes) -> list[int] | None:
    out: list[int] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b <= 0x7f:
            out.append(b)
            i += 1
        elif b >= 0xe0:
            out.append(b - 0x100)
            i += 1
        else:
            fmt = _UNPACK.get(b)
            if fmt is None:
                return None
            size = struct.calcsize(fmt)
            if i + 1 + size > n:
                return None
            v = struct.unpack_from(fmt, data, i + 1)[0]
            if isinstance(v, float):
                if v != int(v):
                    return None
                v = int(v)
            out.append(v)
            i += 1 + size
    return out


def decode(value: bytes | str) -> list[int] | None:
    """The twelve counters of a stored wallet (any of the three forms); None when it is
    not one."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if not raw:
        return None
    first = raw[0]
    try:
        if first == 0x5b:  # '['
            v = json.loads(raw)
            ints = [int(x) for x in v] if isinstance(v, list) else None
        elif first == 0x2d or 0x30 <= first <= 0x39:  # '-' or a digit
            ints = [int(x) for x in raw.split(b",")]
        else:
            ints = _msgpack_ints(raw)
    except (ValueError, TypeError):
        return None
    return ints if ints is not None and len(ints) == len(FIELDS) else None


def _int(v: int) -> bytes:
    if v >= 0:
        if v <= 0x7f:
            return bytes((v,))
        for tag, fmt, top in ((0xcc, ">B", 0xff), (0xcd, ">H", 0xffff),
                              (0xce, ">I", 0xffffffff)):
            if v <= top:
                return bytes((tag,)) + struct.pack(fmt, v)
        return b"\xcf" + struct.pack(">Q", v)
    if v >= -32:
        return bytes((v + 0x100,))
    for tag, fmt, bottom in ((0xd0, ">b", -0x80), (0xd1, ">h", -0x8000),
                             (0xd2, ">i", -0x80000000)):
        if v >= bottom:
            return bytes((tag,)) + struct.pack(fmt, v)
    return b"\xd3" + struct.pack(">q", v)


def encode(counters: Sequence[int]) -> bytes:
    """The MessagePack form lib.lua writes (the same bytes as cmsgpack.pack)."""
    if len(counters) != len(FIELDS):
        raise ValueError(f"a wallet has {len(FIELDS)} counters, not {len(counters)}")
    return b"".join(_int(int(v)) for v in counters)


def text(value: bytes | str) -> str | None:
    """The JSON array form of a stored wallet (what snapshots keep); None when it is not
    one."""
    ints = decode(value)
    return None if ints is None else "[" + ",".join(map(str, ints)) + "]"
