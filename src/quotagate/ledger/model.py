"""Frozen value types of the domain; the transport converts them to and from protobuf.

The types every runtime call builds (subjects, charges, balances, results) are
NamedTuples: as immutable as frozen dataclasses and about five times cheaper to build
(a frozen dataclass sets each field through object.__setattr__), which a Reserve does
a dozen times. Configuration types stay dataclasses."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class Decision(enum.Enum):
    GRANTED = "G"
    DENIED = "D"


class DenyReason(enum.Enum):
    NONE = ""
    INSUFFICIENT_BALANCE = "insufficient"
    SEAT_LIMIT_REACHED = "seat"
    OVERAGE_CAP_REACHED = "overage"
    FEATURE_DISABLED = "feature"
    AI_DISABLED = "ai"
    ASSISTANT_INACTIVE = "inactive"
    UNKNOWN_SUBJECT = "unknown"


class HoldState(enum.IntEnum):
    HELD = 1
    COMMITTED = 2
    REFUNDED = 3
    EXPIRED = 4


class MeterKind(enum.Enum):
    COUNTER = "c"  # resets every period (message tokens, call seconds, …)
    GAUGE = "g"  # never resets, may go down (storage bytes)


class Subject(NamedTuple):
    org_id: str
    team_id: str = ""
    seat_id: str = ""
    assistant_id: str = ""


class Charge(NamedTuple):
    meter: str
    amount: int


class MeterBalance(NamedTuple):
    """The `[used/total used]` meter of a subject plus its parts (DESIGN §4)."""

    meter: str
    used: int
    total: int
    remaining: int
    reserved: int
    monthly_granted: int
    monthly_used: int
    topup_remaining: int
    overage_used: int
    overage_cap: int
    debt: int
    period_start_ms: int
    period_end_ms: int


class ReserveResult(NamedTuple):
    decision: Decision
    reason: DenyReason
    silent: bool
    reservation_id: str
    granted: tuple[Charge, ...]
    expires_at_ms: int
    balances: tuple[MeterBalance, ...]
    replayed: bool = False


class CheckResult(NamedTuple):
    active: bool
    reason: DenyReason
    silent: bool
    balances: tuple[MeterBalance, ...]


class ChargeResult(NamedTuple):
    """Answer of Ledger.charge_now: granted and charged at once, or denied (nothing)."""

    decision: Decision
    reason: DenyReason
    silent: bool
    charged: tuple[Charge, ...]
    balances: tuple[MeterBalance, ...]


class HoldResult(NamedTuple):
    """Answer of Commit (`amounts` = charged) and Refund (`amounts` = refunded)."""

    state: HoldState
    amounts: tuple[Charge, ...]
    balances: tuple[MeterBalance, ...]


class ExtendResult(NamedTuple):
    decision: Decision
    reason: DenyReason
    silent: bool
    granted: tuple[Charge, ...]
    expires_at_ms: int


class TopUpResult(NamedTuple):
    applied: bool
    balance: MeterBalance


@dataclass(frozen=True, slots=True)
class Allowance:
    meter: str
    monthly: int = 0
    per_seat: int = 0
    one_time: int = 0  # granted once per org (a trial), into the top-up bucket


@dataclass(frozen=True, slots=True)
class SeatLimit:
    meter: str
    monthly_limit: int = 0
    unlimited: bool = False


@dataclass(frozen=True, slots=True)
class Catalog:
    """Meters, plans and priced actions (DESIGN §1): data, loaded from a TOML file."""

    meters: Mapping[str, MeterKind]
    plans: Mapping[str, tuple[Allowance, ...]] = field(default_factory=dict)
    actions: Mapping[str, tuple[Charge, ...]] = field(default_factory=dict)
    default_meter: str = "message_tokens"
    #: meters whose running dry stops only their own feature: no assistant is deactivated
    #: (the catalog's `deactivates_assistants = false`)
    quiet_meters: frozenset[str] = frozenset()
