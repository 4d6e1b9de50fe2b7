import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from quotagate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AllocationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_MODE_UNSPECIFIED: _ClassVar[AllocationMode]
    ALLOCATION_MODE_PER_SEAT: _ClassVar[AllocationMode]
    ALLOCATION_MODE_EVEN: _ClassVar[AllocationMode]
    ALLOCATION_MODE_CUSTOM: _ClassVar[AllocationMode]

class Bucket(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUCKET_UNSPECIFIED: _ClassVar[Bucket]
    BUCKET_MONTHLY: _ClassVar[Bucket]
    BUCKET_TOPUP: _ClassVar[Bucket]
ALLOCATION_MODE_UNSPECIFIED: AllocationMode
ALLOCATION_MODE_PER_SEAT: AllocationMode
ALLOCATION_MODE_EVEN: AllocationMode
ALLOCATION_MODE_CUSTOM: AllocationMode
BUCKET_UNSPECIFIED: Bucket
BUCKET_MONTHLY: Bucket
BUCKET_TOPUP: Bucket

class Allowance(_message.Message):
    __slots__ = ("meter", "monthly", "per_seat", "one_time")
    METER_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_FIELD_NUMBER: _ClassVar[int]
    PER_SEAT_FIELD_NUMBER: _ClassVar[int]
    ONE_TIME_FIELD_NUMBER: _ClassVar[int]
    meter: str
    monthly: int
    per_seat: int
    one_time: int
    def __init__(self, meter: _Optional[str] = ..., monthly: _Optional[int] = ..., per_seat: _Optional[int] = ..., one_time: _Optional[int] = ...) -> None: ...

class UpsertPlanRequest(_message.Message):
    __slots__ = ("name", "allowances")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    allowances: _containers.RepeatedCompositeFieldContainer[Allowance]
    def __init__(self, name: _Optional[str] = ..., allowances: _Optional[_Iterable[_Union[Allowance, _Mapping]]] = ...) -> None: ...

class UpsertPlanResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class UpsertOrgRequest(_message.Message):
    __slots__ = ("org_id", "plan", "seats", "period_anchor_day", "ai_enabled")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SEATS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_ANCHOR_DAY_FIELD_NUMBER: _ClassVar[int]
    AI_ENABLED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    plan: str
    seats: int
    period_anchor_day: int
    ai_enabled: bool
    def __init__(self, org_id: _Optional[str] = ..., plan: _Optional[str] = ..., seats: _Optional[int] = ..., period_anchor_day: _Optional[int] = ..., ai_enabled: _Optional[bool] = ...) -> None: ...

class UpsertOrgResponse(_message.Message):
    __slots__ = ("created", "balances")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    created: bool
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, created: _Optional[bool] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class UpsertTeamRequest(_message.Message):
    __slots__ = ("org_id", "team_id", "seats")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEATS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    team_id: str
    seats: int
    def __init__(self, org_id: _Optional[str] = ..., team_id: _Optional[str] = ..., seats: _Optional[int] = ...) -> None: ...

class UpsertTeamResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class SeatLimit(_message.Message):
    __slots__ = ("meter", "monthly_limit", "unlimited")
    METER_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    meter: str
    monthly_limit: int
    unlimited: bool
    def __init__(self, meter: _Optional[str] = ..., monthly_limit: _Optional[int] = ..., unlimited: _Optional[bool] = ...) -> None: ...

class UpsertSeatRequest(_message.Message):
    __slots__ = ("org_id", "seat_id", "team_id", "limits")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    SEAT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    seat_id: str
    team_id: str
    limits: _containers.RepeatedCompositeFieldContainer[SeatLimit]
    def __init__(self, org_id: _Optional[str] = ..., seat_id: _Optional[str] = ..., team_id: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[SeatLimit, _Mapping]]] = ...) -> None: ...

class UpsertSeatResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class UpsertAssistantRequest(_message.Message):
    __slots__ = ("org_id", "assistant_id", "team_id", "enabled")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    assistant_id: str
    team_id: str
    enabled: bool
    def __init__(self, org_id: _Optional[str] = ..., assistant_id: _Optional[str] = ..., team_id: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class UpsertAssistantResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class SetFeatureRequest(_message.Message):
    __slots__ = ("org_id", "team_id", "feature", "enabled")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    team_id: str
    feature: str
    enabled: bool
    def __init__(self, org_id: _Optional[str] = ..., team_id: _Optional[str] = ..., feature: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class SetFeatureResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetAllocationTemplateRequest(_message.Message):
    __slots__ = ("org_id", "meter", "mode", "per_seat", "custom")
    class CustomEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PER_SEAT_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    mode: AllocationMode
    per_seat: int
    custom: _containers.ScalarMap[str, int]
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., mode: _Optional[_Union[AllocationMode, str]] = ..., per_seat: _Optional[int] = ..., custom: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SetAllocationTemplateResponse(_message.Message):
    __slots__ = ("allocations",)
    class AllocationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.ScalarMap[str, int]
    def __init__(self, allocations: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SetOverageRequest(_message.Message):
    __slots__ = ("org_id", "meter", "cap", "unit_price_micros", "bill_every_micros")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_MICROS_FIELD_NUMBER: _ClassVar[int]
    BILL_EVERY_MICROS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    cap: int
    unit_price_micros: int
    bill_every_micros: int
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., cap: _Optional[int] = ..., unit_price_micros: _Optional[int] = ..., bill_every_micros: _Optional[int] = ...) -> None: ...

class SetOverageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetAutoTopUpRequest(_message.Message):
    __slots__ = ("org_id", "meter", "threshold", "amount", "enabled", "cooldown_seconds", "max_per_period")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_PERIOD_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    threshold: int
    amount: int
    enabled: bool
    cooldown_seconds: int
    max_per_period: int
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., threshold: _Optional[int] = ..., amount: _Optional[int] = ..., enabled: _Optional[bool] = ..., cooldown_seconds: _Optional[int] = ..., max_per_period: _Optional[int] = ...) -> None: ...

class SetAutoTopUpResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TopUpRequest(_message.Message):
    __slots__ = ("org_id", "meter", "amount", "purchase_id", "team_id", "seat_id")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEAT_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    amount: int
    purchase_id: str
    team_id: str
    seat_id: str
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., amount: _Optional[int] = ..., purchase_id: _Optional[str] = ..., team_id: _Optional[str] = ..., seat_id: _Optional[str] = ...) -> None: ...

class TopUpResponse(_message.Message):
    __slots__ = ("applied", "balances")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, applied: _Optional[bool] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("org_id", "meter", "from_team_id", "from_seat_id", "to_team_id", "to_seat_id", "amount", "bucket", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    FROM_TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEAT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    TO_SEAT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    from_team_id: str
    from_seat_id: str
    to_team_id: str
    to_seat_id: str
    amount: int
    bucket: Bucket
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., from_team_id: _Optional[str] = ..., from_seat_id: _Optional[str] = ..., to_team_id: _Optional[str] = ..., to_seat_id: _Optional[str] = ..., amount: _Optional[int] = ..., bucket: _Optional[_Union[Bucket, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("balances",)
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class AdjustRequest(_message.Message):
    __slots__ = ("org_id", "meter", "delta", "reason", "idempotency_key")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    delta: int
    reason: str
    idempotency_key: str
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., delta: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AdjustResponse(_message.Message):
    __slots__ = ("balances",)
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class ListUsageRequest(_message.Message):
    __slots__ = ("org_id", "meter", "start", "end", "group_by", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    meter: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., meter: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("group", "meter", "amount")
    class GroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    group: _containers.ScalarMap[str, str]
    meter: str
    amount: int
    def __init__(self, group: _Optional[_Mapping[str, str]] = ..., meter: _Optional[str] = ..., amount: _Optional[int] = ...) -> None: ...

class ListUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("org_id", "after")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    after: str
    def __init__(self, org_id: _Optional[str] = ..., after: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "type", "org_id", "attributes", "at", "cursor")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    org_id: str
    attributes: _containers.ScalarMap[str, str]
    at: _timestamp_pb2.Timestamp
    cursor: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., org_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cursor: _Optional[str] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...
