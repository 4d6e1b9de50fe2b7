"""proto <-> domain conversions shared by the servicers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from quotagate.ledger import model
from quotagate.v1 import common_pb2

DECISION = {
    model.Decision.GRANTED: common_pb2.DECISION_GRANTED,
    model.Decision.DENIED: common_pb2.DECISION_DENIED,
}
REASON = {r: getattr(common_pb2, "DENY_REASON_" + (r.name if r.value else "UNSPECIFIED"))
          for r in model.DenyReason}
HOLD_STATE = {s: getattr(common_pb2, "HOLD_STATE_" + s.name) for s in model.HoldState}


def ts(ms: int) -> dict[str, int]:
    """A Timestamp field's value as constructor keywords (the message is built in place,
    not built and then copied in)."""
    return {"seconds": ms // 1000, "nanos": ms % 1000 * 1_000_000}


def subject(s: common_pb2.Subject) -> model.Subject:
    return model.Subject(s.org_id, s.team_id, s.seat_id, s.assistant_id)


def charges(items: Iterable[common_pb2.Charge]) -> list[model.Charge]:
    return [model.Charge(c.meter, c.amount) for c in items]


def charges_pb(items: Iterable[model.Charge]) -> list[dict[str, object]]:
    """Repeated Charge fields as constructor keywords, like `ts`."""
    return [{"meter": c.meter, "amount": c.amount} for c in items]




#: period bounds as Timestamp messages: few distinct values (period starts and ends),
#: reused instead of built for every balance of every reply
_PERIOD_TS: dict[int, Timestamp] = {}


def period_ts(ms: int) -> Timestamp | None:
    """A period bound; None (the field unset) for 0: a gauge meter has no period."""
    if not ms:
        return None
    t = _PERIOD_TS.get(ms)
    if t is None:
        if len(_PERIOD_TS) >= 4096:
            _PERIOD_TS.clear()
        t = _PERIOD_TS[ms] = Timestamp(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)
    return t


def balance_pb(b: model.MeterBalance) -> common_pb2.MeterBalance:
    return common_pb2.MeterBalance(
        meter=b.meter, used=b.used, total=b.total, remaining=b.remaining, reserved=b.reserved,
        monthly_granted=b.monthly_granted, monthly_used=b.monthly_used,
        topup_remaining=b.topup_remaining, overage_used=b.overage_used,
        overage_cap=b.overage_cap, debt=b.debt, period_start=period_ts(b.period_start_ms),
        period_end=period_ts(b.period_end_ms))


def balances_pb(items: Iterable[model.MeterBalance]) -> list[common_pb2.MeterBalance]:
    return [balance_pb(b) for b in items]


def add_balances(field: Any, items: Iterable[model.MeterBalance]) -> None:
    """Append to a repeated MeterBalance field of a reply, each built in place (a message
    given to a constructor is built, then copied in: a quarter more time)."""
    for b in items:
        field.add(meter=b.meter, used=b.used, total=b.total, remaining=b.remaining,
                  reserved=b.reserved, monthly_granted=b.monthly_granted,
                  monthly_used=b.monthly_used, topup_remaining=b.topup_remaining,
                  overage_used=b.overage_used, overage_cap=b.overage_cap, debt=b.debt,
                  period_start=period_ts(b.period_start_ms),
                  period_end=period_ts(b.period_end_ms))


def add_charges(field: Any, items: Iterable[model.Charge]) -> None:
    """Append to a repeated Charge field of a reply, in place."""
    for c in items:
        field.add(meter=c.meter, amount=c.amount)
