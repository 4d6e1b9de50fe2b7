"""Produce events the way the Lua scripts do: XADD to the shard's events stream with the
fields id, type, org, attrs (JSON of strings), at (ms)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from quotagate.ledger.keys import Keys

KEYS = Keys(64)  # the shards of the `server` fixture


async def xadd(redis: Any, etype: str, org: str, attrs: dict[str, str] | None = None,
               at: int = 1_762_732_800_000, eid: str = "", keys: Keys = KEYS) -> str:
    eid = eid or f"{etype}:{org}:{uuid.uuid4().hex[:8]}"
    await redis.xadd(keys.events(keys.shard_of(org)), {
        "id": eid, "type": etype, "org": org,
        "attrs": json.dumps(attrs or {}, separators=(",", ":")), "at": str(at)})
    return eid
