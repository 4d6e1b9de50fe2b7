"""Reserve before an AI response, Commit what it really used: against `make run`.

    .venv/bin/python examples/quickstart.py [127.0.0.1:50051]
"""

import sys
import uuid

import grpc

from quotagate.v1 import common_pb2, quota_pb2, quota_pb2_grpc

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with grpc.insecure_channel(target) as channel:
    quota = quota_pb2_grpc.QuotaServiceStub(channel)
    who = common_pb2.Subject(org_id="demo", seat_id="alice", assistant_id="helpdesk-bot")
    r = quota.Reserve(quota_pb2.ReserveRequest(
        subject=who, charges=[common_pb2.Charge(meter="message_tokens", amount=2_000)],
        idempotency_key=str(uuid.uuid4())))
    if r.decision != common_pb2.DECISION_GRANTED:
        # silent = true: hide the assistant, say nothing to the end user.
        print("denied:", common_pb2.DenyReason.Name(r.reason), "silent:", r.silent)
        sys.exit(0)
    # ... call the model here; it used 1,733 tokens ...
    c = quota.Commit(quota_pb2.CommitRequest(
        reservation_id=r.reservation_id,
        actual=[common_pb2.Charge(meter="message_tokens", amount=1_733)]))
    b = c.balances[0]
    print(f"committed {c.charged[0].amount} tokens; meter [{b.used:,}/{b.total:,} used]")
