"""The Python SDK of quotagate's runtime calls (DESIGN §7 `client/`).

    from quotagate.client import QuotaClient, subject, estimate

    async with QuotaClient("127.0.0.1:50051", api_key=KEY) as qg:
        who = subject("acme", seat="alice", assistant="helpdesk-bot")
        need = {"message_tokens": estimate.message_tokens(prompt, 800)}
        async with qg.reservation(who, need) as hold:
            if not hold.granted:
                ...  # hold.silent: hide the assistant; else tell the user hold.reason
            else:
                answer = await run_model(prompt)
                hold.use({"message_tokens": answer.usage.total_tokens})

`SyncQuotaClient` is the same without an event loop. Responses are the API's own
messages (`quotagate.v1.quota_pb2`).
"""

from __future__ import annotations

from quotagate.client import estimate
from quotagate.client.aio import QuotaClient, Reservation
from quotagate.client.sync import SyncQuotaClient, SyncReservation
from quotagate.v1 import common_pb2


def subject(org: str, team: str = "", seat: str = "", assistant: str = "") -> common_pb2.Subject:
    """Who spends: the org, and where known the team, seat and assistant."""
    return common_pb2.Subject(org_id=org, team_id=team, seat_id=seat, assistant_id=assistant)


__all__ = ["QuotaClient", "Reservation", "SyncQuotaClient", "SyncReservation", "estimate",
           "subject"]
