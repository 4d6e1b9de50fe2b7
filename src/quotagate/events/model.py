"""An event as the scripts write it to ``keys.events(shard)``.

Stream entry fields: ``id`` (stable, for de-duplication), ``type``, ``org`` (raw org id),
``attrs`` (JSON object of strings), ``at`` (ms, server clock).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES = (
    "wallet.low", "wallet.exhausted", "wallet.replenished", "assistant.deactivated",
    "assistant.reactivated", "auto_topup.requested", "overage.threshold_reached",
    "overage.period_closed", "period.reset",
)


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    org_id: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    at_ms: int = 0
    #: where it was read: the shard's stream key and the entry id in it
    stream: str = ""
    entry_id: str = ""

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], stream: str = "",
                    entry_id: str = "") -> Event:
        """Parse a stream entry. Tolerant: a missing or malformed field becomes empty, so
        one bad entry never stops delivery of the others."""
        f = {_s(k): _s(v) for k, v in fields.items()}
        try:
            raw = json.loads(f.get("attrs") or "{}")
            attrs = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except ValueError:
            attrs = {}
        try:
            at = int(f.get("at") or 0)
        except ValueError:
            at = 0
        return cls(id=f.get("id") or f"{stream}/{entry_id}", type=f.get("type", ""),
                   org_id=f.get("org", ""), attributes=attrs, at_ms=at, stream=stream,
                   entry_id=entry_id)

    def to_json(self) -> dict[str, Any]:
        """The webhook body (and the dead-letter copy)."""
        at = dt.datetime.fromtimestamp(self.at_ms / 1000, dt.UTC)
        return {"id": self.id, "type": self.type, "org_id": self.org_id,
                "attributes": dict(self.attributes),
                "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "at_ms": self.at_ms}

    def body(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()
