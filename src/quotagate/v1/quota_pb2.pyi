import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from quotagate.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveRequest(_message.Message):
    __slots__ = ("subject", "charges", "action", "feature", "idempotency_key", "ttl_seconds", "allow_partial", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CHARGES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    subject: _common_pb2.Subject
    charges: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    action: str
    feature: str
    idempotency_key: str
    ttl_seconds: int
    allow_partial: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, subject: _Optional[_Union[_common_pb2.Subject, _Mapping]] = ..., charges: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., action: _Optional[str] = ..., feature: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., allow_partial: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("decision", "reason", "silent", "reservation_id", "granted", "expires_at", "balances")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    decision: _common_pb2.Decision
    reason: _common_pb2.DenyReason
    silent: bool
    reservation_id: str
    granted: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    expires_at: _timestamp_pb2.Timestamp
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, decision: _Optional[_Union[_common_pb2.Decision, str]] = ..., reason: _Optional[_Union[_common_pb2.DenyReason, str]] = ..., silent: _Optional[bool] = ..., reservation_id: _Optional[str] = ..., granted: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "actual", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, reservation_id: _Optional[str] = ..., actual: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("state", "charged", "balances")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.HoldState
    charged: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, state: _Optional[_Union[_common_pb2.HoldState, str]] = ..., charged: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class RefundRequest(_message.Message):
    __slots__ = ("reservation_id", "amount", "reason")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    amount: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    reason: str
    def __init__(self, reservation_id: _Optional[str] = ..., amount: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class RefundResponse(_message.Message):
    __slots__ = ("state", "refunded", "balances")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.HoldState
    refunded: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, state: _Optional[_Union[_common_pb2.HoldState, str]] = ..., refunded: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("reservation_id", "additional", "ttl_seconds")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    additional: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    ttl_seconds: int
    def __init__(self, reservation_id: _Optional[str] = ..., additional: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("decision", "reason", "granted", "expires_at")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    decision: _common_pb2.Decision
    reason: _common_pb2.DenyReason
    granted: _containers.RepeatedCompositeFieldContainer[_common_pb2.Charge]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, decision: _Optional[_Union[_common_pb2.Decision, str]] = ..., reason: _Optional[_Union[_common_pb2.DenyReason, str]] = ..., granted: _Optional[_Iterable[_Union[_common_pb2.Charge, _Mapping]]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("subject", "meter", "feature")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    subject: _common_pb2.Subject
    meter: str
    feature: str
    def __init__(self, subject: _Optional[_Union[_common_pb2.Subject, _Mapping]] = ..., meter: _Optional[str] = ..., feature: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("active", "reason", "silent", "balances")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    active: bool
    reason: _common_pb2.DenyReason
    silent: bool
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, active: _Optional[bool] = ..., reason: _Optional[_Union[_common_pb2.DenyReason, str]] = ..., silent: _Optional[bool] = ..., balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("subject", "meters")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    subject: _common_pb2.Subject
    meters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subject: _Optional[_Union[_common_pb2.Subject, _Mapping]] = ..., meters: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("balances",)
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    balances: _containers.RepeatedCompositeFieldContainer[_common_pb2.MeterBalance]
    def __init__(self, balances: _Optional[_Iterable[_Union[_common_pb2.MeterBalance, _Mapping]]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("org_id", "assistant_ids")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_IDS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    assistant_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, org_id: _Optional[str] = ..., assistant_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("assistant_id", "active", "reason", "at")
    ASSISTANT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    assistant_id: str
    active: bool
    reason: _common_pb2.DenyReason
    at: _timestamp_pb2.Timestamp
    def __init__(self, assistant_id: _Optional[str] = ..., active: _Optional[bool] = ..., reason: _Optional[_Union[_common_pb2.DenyReason, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
