"""Input checks shared by every entry point. Each failure names the field."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from quotagate.errors import InvalidArgument
from quotagate.ledger.model import Catalog, Charge, MeterKind, Subject

MAX_AMOUNT = 2**50
MAX_ID_BYTES = 128
#: labels of a hold or a charge, as compact JSON with sorted keys (what the ledger stores)
MAX_LABELS_BYTES = 4096
#: C0 and C1 control characters and lone surrogates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def ident(value: str, field: str, required: bool = True) -> str:
    """Ids are opaque UTF-8 strings of 1–128 bytes without control characters."""
    if value == "":
        if required:
            raise InvalidArgument("is required", field)
        return value
    # at most 4 bytes a character: 32 characters always fit
    if len(value) > MAX_ID_BYTES // 4 and \
            len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidArgument(f"must be at most {MAX_ID_BYTES} bytes", field)
    if _CONTROL.search(value):
        raise InvalidArgument("must not contain control characters", field)
    return value


def amount(value: int, field: str, allow_zero: bool = False) -> int:
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument("must be greater than 0" if not allow_zero
                              else "must not be negative", field)
    if value > MAX_AMOUNT:
        raise InvalidArgument("must be at most 2^50", field)
    return value


_SUBJECT_FIELDS = ("subject.org_id", "subject.team_id", "subject.seat_id",
                   "subject.assistant_id")


def subject(s: Subject, field: str = "subject") -> Subject:
    names = _SUBJECT_FIELDS if field == "subject" else \
        tuple(f"{field}.{n}" for n in ("org_id", "team_id", "seat_id", "assistant_id"))
    ident(s.org_id, names[0])
    ident(s.team_id, names[1], required=False)
    ident(s.seat_id, names[2], required=False)
    ident(s.assistant_id, names[3], required=False)
    return s


def meter(catalog: Catalog, name: str, field: str) -> MeterKind:
    if not name:
        raise InvalidArgument("is required", field)
    kind = catalog.meters.get(name)
    if kind is None:
        raise InvalidArgument(f"unknown meter {name!r}", field)
    return kind


def charges(catalog: Catalog, items: Iterable[Charge], field: str,
            allow_zero: bool = False, required: bool = True) -> tuple[Charge, ...]:
    out = tuple(items)
    if required and not out:
        raise InvalidArgument("at least one charge is required", field)
    meters = catalog.meters
    seen: set[str] = set()
    for i, c in enumerate(out):
        # the common case checked inline; the field's name is only built for an error
        if c.meter not in meters:
            meter(catalog, c.meter, f"{field}[{i}].meter")
        a = c.amount
        if not (0 < a <= MAX_AMOUNT or (a == 0 and allow_zero)):
            amount(a, f"{field}[{i}].amount", allow_zero)
        if c.meter in seen:
            raise InvalidArgument(f"meter {c.meter!r} appears twice", f"{field}[{i}].meter")
        seen.add(c.meter)
    return out


def labels(items: Mapping[str, str] | None, field: str = "labels") -> None:
    """Labels are at most 4,096 bytes in all, measured as the ledger stores them: compact
    JSON with sorted keys (non-ASCII escaped, so characters are bytes)."""
    if items and len(json.dumps(dict(sorted(items.items())),
                                separators=(",", ":"))) > MAX_LABELS_BYTES:
        raise InvalidArgument(f"labels must be at most {MAX_LABELS_BYTES} bytes as JSON",
                              field)
