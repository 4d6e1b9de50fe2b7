"""Reserve before an AI response, Commit what it really used: against `make run`.

    .venv/bin/python examples/quickstart.py [127.0.0.1:50051]
"""

import sys

from quotagate.client import SyncQuotaClient, subject

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with SyncQuotaClient(target) as quota:
    who = subject("demo", seat="alice", assistant="helpdesk-bot")
    with quota.reservation(who, {"message_tokens": 2_000}) as hold:
        if not hold.granted:
            # silent: hide the assistant, say nothing to the end user.
            print("denied:", hold.reason, "silent:", hold.silent)
            sys.exit(0)
        # ... call the model here; it used 1,733 tokens ...
        hold.use({"message_tokens": 1_733})
    charged, b = hold.outcome.charged[0], hold.outcome.balances[0]
    print(f"committed {charged.amount} tokens; meter [{b.used:,}/{b.total:,} used]")
