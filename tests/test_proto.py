"""The API contract: the generated stubs are fresh, every name of DESIGN §4 exists, every
element of the protos is documented, and `buf lint` (STANDARD) is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"

try:
    import quotagate.v1  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

from google.protobuf import descriptor_pb2  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402

from quotagate.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    quota_pb2,
    quota_pb2_grpc,
)

# -- the contract of DESIGN §4, written out ---------------------------------------------

QUOTA_REQUESTS: dict[str, set[str]] = {
    "Reserve": {"subject", "charges", "action", "feature", "idempotency_key", "ttl_seconds",
                "allow_partial", "labels"},
    "Commit": {"reservation_id", "actual", "labels"},
    "Refund": {"reservation_id", "amount", "reason"},
    "Extend": {"reservation_id", "additional", "ttl_seconds"},
    "Check": {"subject", "meter", "feature"},
    "GetBalance": {"subject", "meters"},
    "WatchStatus": {"org_id", "assistant_ids"},
}
QUOTA_RESPONSES: dict[str, set[str]] = {
    "Reserve": {"decision", "reason", "silent", "reservation_id", "granted", "expires_at",
                "balances"},
    "Commit": {"state", "charged", "balances"},
    "Refund": {"state", "refunded", "balances"},
    "Extend": {"decision", "reason", "granted", "expires_at"},
    "Check": {"active", "reason", "silent", "balances"},
    "GetBalance": {"balances"},
    "WatchStatus": {"assistant_id", "active", "reason", "at"},
}
ADMIN_REQUESTS: dict[str, set[str]] = {
    "UpsertPlan": {"name", "allowances"},
    "UpsertOrg": {"org_id", "plan", "seats", "period_anchor_day", "ai_enabled"},
    "UpsertTeam": {"org_id", "team_id", "seats"},
    "UpsertSeat": {"org_id", "seat_id", "team_id", "limits"},
    "UpsertAssistant": {"org_id", "assistant_id", "team_id", "enabled"},
    "SetFeature": {"org_id", "team_id", "feature", "enabled"},
    "SetAllocationTemplate": {"org_id", "meter", "mode", "per_seat", "custom"},
    "SetOverage": {"org_id", "meter", "cap", "unit_price_micros", "bill_every_micros"},
    "SetAutoTopUp": {"org_id", "meter", "threshold", "amount", "enabled", "cooldown_seconds",
                     "max_per_period"},
    "TopUp": {"org_id", "meter", "amount", "purchase_id", "team_id", "seat_id"},
    "Transfer": {"org_id", "meter", "from_team_id", "from_seat_id", "to_team_id",
                 "to_seat_id", "amount", "bucket", "idempotency_key"},
    "Adjust": {"org_id", "meter", "delta", "reason", "idempotency_key"},
    "ListUsage": {"org_id", "meter", "start", "end", "group_by", "page_size", "page_token"},
    "WatchEvents": {"org_id"},
}
ADMIN_RESPONSES: dict[str, set[str]] = {
    "UpsertPlan": set(),
    "UpsertOrg": {"balances"},
    "UpsertTeam": set(),
    "UpsertSeat": set(),
    "UpsertAssistant": set(),
    "SetFeature": set(),
    "SetAllocationTemplate": set(),
    "SetOverage": set(),
    "SetAutoTopUp": set(),
    "TopUp": {"applied", "balances"},
    "Transfer": {"balances"},
    "Adjust": {"balances"},
    "ListUsage": {"rows", "next_page_token"},
    "WatchEvents": {"event"},
}
STREAMING = {"WatchStatus", "WatchEvents"}

SHARED_MESSAGES: dict[Any, dict[str, set[str]]] = {
    common_pb2: {
        "Subject": {"org_id", "team_id", "seat_id", "assistant_id"},
        "Charge": {"meter", "amount"},
        "MeterBalance": {"meter", "used", "total", "remaining", "reserved", "monthly_granted",
                         "monthly_used", "topup_remaining", "overage_used", "overage_cap",
                         "debt", "period_start", "period_end"},
    },
    admin_pb2: {
        "Allowance": {"meter", "monthly", "per_seat"},
        "SeatLimit": {"meter", "monthly_limit", "unlimited"},
        "UsageRow": {"group", "meter", "amount"},
        "Event": {"id", "type", "org_id", "attributes", "at"},
    },
}
ENUMS: dict[Any, dict[str, list[str]]] = {
    common_pb2: {
        "Decision": ["DECISION_UNSPECIFIED", "DECISION_GRANTED", "DECISION_DENIED"],
        "DenyReason": [
            "DENY_REASON_UNSPECIFIED", "DENY_REASON_INSUFFICIENT_BALANCE",
            "DENY_REASON_SEAT_LIMIT_REACHED", "DENY_REASON_OVERAGE_CAP_REACHED",
            "DENY_REASON_FEATURE_DISABLED", "DENY_REASON_AI_DISABLED",
            "DENY_REASON_ASSISTANT_INACTIVE", "DENY_REASON_UNKNOWN_SUBJECT",
        ],
        "HoldState": ["HOLD_STATE_UNSPECIFIED", "HOLD_STATE_HELD", "HOLD_STATE_COMMITTED",
                      "HOLD_STATE_REFUNDED", "HOLD_STATE_EXPIRED"],
    },
    admin_pb2: {
        "AllocationMode": ["ALLOCATION_MODE_UNSPECIFIED", "ALLOCATION_MODE_PER_SEAT",
                           "ALLOCATION_MODE_EVEN", "ALLOCATION_MODE_CUSTOM"],
        "Bucket": ["BUCKET_UNSPECIFIED", "BUCKET_MONTHLY", "BUCKET_TOPUP"],
    },
}

# -- (a) the committed stubs are what the protos generate --------------------------------


def test_generated_stubs_are_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, (
        "src/quotagate/v1 is stale, run `make proto`:\n" + proc.stdout + proc.stderr)


def test_generated_imports_are_absolute() -> None:
    for path in (ROOT / "src" / "quotagate" / "v1").glob("*_pb2*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "_pb2" in line and line.startswith("import "):
                pytest.fail(f"{path.name}: bare import {line!r}")


# -- (b) every name of DESIGN §4 exists ----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "service", "requests", "responses"),
    [
        (quota_pb2, "QuotaService", QUOTA_REQUESTS, QUOTA_RESPONSES),
        (admin_pb2, "AdminService", ADMIN_REQUESTS, ADMIN_RESPONSES),
    ],
)
def test_service_methods_and_fields(module: Any, service: str, requests: dict[str, set[str]],
                                    responses: dict[str, set[str]]) -> None:
    methods = module.DESCRIPTOR.services_by_name[service].methods_by_name
    assert set(methods) == set(requests), f"{service} methods"
    for rpc, fields in requests.items():
        m = methods[rpc]
        assert m.input_type.full_name == f"quotagate.v1.{rpc}Request"
        assert m.output_type.full_name == f"quotagate.v1.{rpc}Response"
        assert not m.client_streaming, rpc
        assert m.server_streaming == (rpc in STREAMING), rpc
        missing = fields - set(m.input_type.fields_by_name)
        assert not missing, f"{rpc}Request lacks {sorted(missing)}"
        missing = responses[rpc] - set(m.output_type.fields_by_name)
        assert not missing, f"{rpc}Response lacks {sorted(missing)}"


def test_grpc_stubs_and_servicers_exist() -> None:
    for grpc_module, service, rpcs in ((quota_pb2_grpc, "QuotaService", QUOTA_REQUESTS),
                                        (admin_pb2_grpc, "AdminService", ADMIN_REQUESTS)):
        servicer = getattr(grpc_module, f"{service}Servicer")
        for rpc in rpcs:
            assert callable(getattr(servicer, rpc)), f"{service}Servicer.{rpc}"
        assert callable(getattr(grpc_module, f"{service}Stub"))
        assert callable(getattr(grpc_module, f"add_{service}Servicer_to_server"))


def test_shared_messages() -> None:
    for module, messages in SHARED_MESSAGES.items():
        for name, fields in messages.items():
            desc = module.DESCRIPTOR.message_types_by_name[name]
            missing = fields - set(desc.fields_by_name)
            assert not missing, f"{name} lacks {sorted(missing)}"


def test_enums_in_order() -> None:
    for module, enums in ENUMS.items():
        for name, values in enums.items():
            desc = module.DESCRIPTOR.enum_types_by_name[name]
            assert [v.name for v in desc.values] == values, name
            assert [v.number for v in desc.values] == list(range(len(values))), name


def test_amounts_are_int64_and_periods_timestamps() -> None:
    mb = common_pb2.MeterBalance.DESCRIPTOR
    for f in mb.fields:
        if f.name == "meter":
            assert f.type == FieldDescriptor.TYPE_STRING
        elif f.name in ("period_start", "period_end"):
            assert f.message_type.full_name == "google.protobuf.Timestamp", f.name
        else:
            assert f.type == FieldDescriptor.TYPE_INT64, f"MeterBalance.{f.name}"
    assert common_pb2.Charge.DESCRIPTOR.fields_by_name["amount"].type == \
        FieldDescriptor.TYPE_INT64
    for msg, field in (("TopUpRequest", "amount"), ("TransferRequest", "amount"),
                       ("AdjustRequest", "delta"), ("SetOverageRequest", "cap"),
                       ("UpsertOrgRequest", "seats")):
        desc = admin_pb2.DESCRIPTOR.message_types_by_name[msg]
        assert desc.fields_by_name[field].type == FieldDescriptor.TYPE_INT64, msg


def test_messages_round_trip() -> None:
    req = quota_pb2.ReserveRequest(
        subject=common_pb2.Subject(org_id="acme", seat_id="a:{b}"),
        charges=[common_pb2.Charge(meter="message_tokens", amount=2**50)],
        idempotency_key="k", labels={"conversation": "c-1"})
    assert quota_pb2.ReserveRequest.FromString(req.SerializeToString()) == req


# -- every element is documented -----------------------------------------------------------

# Field numbers of descriptor.proto used to address source locations.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    wkt = str(Path(protoc.__file__).parent / "_proto")
    files = sorted(str(p) for p in (PROTO_ROOT / "quotagate" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{wkt}", "--include_source_info",
                            f"--descriptor_set_out={out}", *files])
        assert code == 0, "protoc failed"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(f: descriptor_pb2.FileDescriptorProto) -> list[tuple[tuple[int, ...], str]]:
    out: list[tuple[tuple[int, ...], str]] = []

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, name: str) -> None:
        out.append((path, name))
        for i, v in enumerate(e.value):
            out.append(((*path, _ENUM_VALUE, i), f"{name}.{v.name}"))

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, name: str) -> None:
        if m.options.map_entry:
            return
        out.append((path, name))
        for i, fld in enumerate(m.field):
            out.append(((*path, _MSG_FIELD, i), f"{name}.{fld.name}"))
        for i, nested in enumerate(m.nested_type):
            message((*path, _MSG_NESTED, i), nested, f"{name}.{nested.name}")
        for i, e in enumerate(m.enum_type):
            enum((*path, _MSG_ENUM, i), e, f"{name}.{e.name}")

    for i, m in enumerate(f.message_type):
        message((_FILE_MESSAGE, i), m, m.name)
    for i, e in enumerate(f.enum_type):
        enum((_FILE_ENUM, i), e, e.name)
    for i, s in enumerate(f.service):
        out.append(((_FILE_SERVICE, i), s.name))
        for j, meth in enumerate(s.method):
            out.append(((_FILE_SERVICE, i, _SERVICE_METHOD, j), f"{s.name}.{meth.name}"))
    return out


def test_every_element_is_documented() -> None:
    undocumented: list[str] = []
    for f in _descriptor_set().file:
        if not f.name.startswith("quotagate/"):
            continue
        commented = {tuple(loc.path) for loc in f.source_code_info.location
                     if loc.leading_comments.strip()}
        undocumented += [f"{f.name}: {name}" for path, name in _elements(f)
                         if path not in commented]
    assert not undocumented, "add a leading comment to:\n" + "\n".join(undocumented)


# -- (c) buf lint --------------------------------------------------------------------------


def _buf() -> str | None:
    return shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")


def test_buf_lint() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf CLI not installed (pip install buf-bin)")
    proc = subprocess.run([buf, "lint"], cwd=PROTO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_two_installed_packages_write_the_same_generated_protos() -> None:
    """pip lets two distributions install the same file and keeps the last one: the
    OpenTelemetry exporter broke when another package's old copy of
    opentelemetry/proto/... won (it depended on install order). quotagate's own Envoy
    messages live in quotagate/envoy for that reason."""
    from importlib import metadata

    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        for f in dist.files or ():
            p = str(f)
            if p.endswith("_pb2.py") and p.startswith(("opentelemetry/", "google/", "envoy/",
                                                         "quotagate/")):
                owners.setdefault(p, set()).add(dist.metadata["Name"])
    shared = {p: sorted(o) for p, o in owners.items() if len(o) > 1}
    assert shared == {}
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")  # what the OTLP exporter imports
