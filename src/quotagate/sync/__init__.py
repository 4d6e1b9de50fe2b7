"""Ledger stream -> SQL: sinks (SQLite, PostgreSQL), migrations, the syncer, restore.

`Syncer.run_once()` copies everything available once (tests drive it step by step);
`quotagate sync` runs it as its own process, `quotagate serve` in-process by default;
`quotagate restore` writes the SQL snapshots back into Redis after a Redis loss.
"""

from quotagate.sync.sink import Sink, UsageQuery, UsageRow, open_sink
from quotagate.sync.syncer import SyncCounts, Syncer, SyncOptions

__all__ = ["Sink", "SyncCounts", "SyncOptions", "Syncer", "UsageQuery", "UsageRow", "open_sink"]
