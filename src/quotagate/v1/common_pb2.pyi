import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_GRANTED: _ClassVar[Decision]
    DECISION_DENIED: _ClassVar[Decision]

class DenyReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENY_REASON_UNSPECIFIED: _ClassVar[DenyReason]
    DENY_REASON_INSUFFICIENT_BALANCE: _ClassVar[DenyReason]
    DENY_REASON_SEAT_LIMIT_REACHED: _ClassVar[DenyReason]
    DENY_REASON_OVERAGE_CAP_REACHED: _ClassVar[DenyReason]
    DENY_REASON_FEATURE_DISABLED: _ClassVar[DenyReason]
    DENY_REASON_AI_DISABLED: _ClassVar[DenyReason]
    DENY_REASON_ASSISTANT_INACTIVE: _ClassVar[DenyReason]
    DENY_REASON_UNKNOWN_SUBJECT: _ClassVar[DenyReason]

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_HELD: _ClassVar[HoldState]
    HOLD_STATE_COMMITTED: _ClassVar[HoldState]
    HOLD_STATE_REFUNDED: _ClassVar[HoldState]
    HOLD_STATE_EXPIRED: _ClassVar[HoldState]
DECISION_UNSPECIFIED: Decision
DECISION_GRANTED: Decision
DECISION_DENIED: Decision
DENY_REASON_UNSPECIFIED: DenyReason
DENY_REASON_INSUFFICIENT_BALANCE: DenyReason
DENY_REASON_SEAT_LIMIT_REACHED: DenyReason
DENY_REASON_OVERAGE_CAP_REACHED: DenyReason
DENY_REASON_FEATURE_DISABLED: DenyReason
DENY_REASON_AI_DISABLED: DenyReason
DENY_REASON_ASSISTANT_INACTIVE: DenyReason
DENY_REASON_UNKNOWN_SUBJECT: DenyReason
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_HELD: HoldState
HOLD_STATE_COMMITTED: HoldState
HOLD_STATE_REFUNDED: HoldState
HOLD_STATE_EXPIRED: HoldState

class Subject(_message.Message):
    __slots__ = ("org_id", "team_id", "seat_id", "assistant_id")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEAT_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    team_id: str
    seat_id: str
    assistant_id: str
    def __init__(self, org_id: _Optional[str] = ..., team_id: _Optional[str] = ..., seat_id: _Optional[str] = ..., assistant_id: _Optional[str] = ...) -> None: ...

class Charge(_message.Message):
    __slots__ = ("meter", "amount")
    METER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    meter: str
    amount: int
    def __init__(self, meter: _Optional[str] = ..., amount: _Optional[int] = ...) -> None: ...

class MeterBalance(_message.Message):
    __slots__ = ("meter", "used", "total", "remaining", "reserved", "monthly_granted", "monthly_used", "topup_remaining", "overage_used", "overage_cap", "debt", "period_start", "period_end")
    METER_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_GRANTED_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_USED_FIELD_NUMBER: _ClassVar[int]
    TOPUP_REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_USED_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_CAP_FIELD_NUMBER: _ClassVar[int]
    DEBT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
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
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    def __init__(self, meter: _Optional[str] = ..., used: _Optional[int] = ..., total: _Optional[int] = ..., remaining: _Optional[int] = ..., reserved: _Optional[int] = ..., monthly_granted: _Optional[int] = ..., monthly_used: _Optional[int] = ..., topup_remaining: _Optional[int] = ..., overage_used: _Optional[int] = ..., overage_cap: _Optional[int] = ..., debt: _Optional[int] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
