"""Every Redis key quotagate uses, in one place.

All keys of an org live under its shard's prefix ``<ns>:{<shard>}:`` where ``shard`` is
``crc32(org_id) mod shards``. The braces are a Redis Cluster hash tag: every key of a shard
hashes to one slot, so one Lua script may touch the org, its teams, seats, holds and the
shard's streams atomically, on a single Redis and on a cluster alike.

Ids are escaped (``escape``) before they enter a key or a hash field: any byte outside
``[A-Za-z0-9_.-]`` becomes ``%XX``. The mapping is injective and reversible, and the result
never holds ``:``, ``{``, ``}``, spaces or non-ASCII, so distinct ids never collide and never
escape their org. The Lua scripts build three keys from a shard prefix themselves
(``h:<rid>``, ``exp``, ``ledger``) — keep those in step with this module.
"""

from __future__ import annotations

import re
import zlib
from urllib.parse import unquote_to_bytes

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_RID = re.compile(r"^r([0-9]{1,6})\.([0-9a-f]{32})$")


def escape(raw: str) -> str:
    """Percent-encode every byte of the UTF-8 form that is not [A-Za-z0-9_.-]."""
    if not _UNSAFE.search(raw):
        return raw
    data = raw.encode("utf-8")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)


def unescape(escaped: str) -> str:
    """Inverse of ``escape``."""
    if "%" not in escaped:
        return escaped
    return unquote_to_bytes(escaped).decode("utf-8")


def cfg_key(prefix: str, org_e: str) -> str:
    """``Keys.cfg`` from a shard prefix and an escaped org id."""
    return f"{prefix}org:{org_e}"


def bal_key(prefix: str, org_e: str, meter_e: str) -> str:
    """``Keys.bal`` from a shard prefix, an escaped org id and an escaped meter."""
    return f"{prefix}bal:{org_e}:{meter_e}"


def idem_key(prefix: str, org_e: str, key_e: str) -> str:
    """``Keys.idem`` from a shard prefix, an escaped org id and an escaped key."""
    return f"{prefix}idem:{org_e}:{key_e}"


def hold_key(prefix: str, reservation_id: str) -> str:
    """``Keys.hold`` from the shard prefix of the reservation id."""
    return f"{prefix}h:{reservation_id}"


class Keys:
    """Key names for a deployment with a fixed number of virtual shards."""

    def __init__(self, shards: int = 256, namespace: str = "qg") -> None:
        self.shards = shards
        self.ns = namespace
        self._prefixes = [f"{namespace}:{{{s}}}:" for s in range(shards)]

    def shard_of(self, org_id: str) -> int:
        return zlib.crc32(org_id.encode("utf-8")) % self.shards

    def prefix(self, shard: int) -> str:
        """``<ns>:{<shard>}:`` — the shard's hash tag; every key of the shard starts so."""
        return self._prefixes[shard]

    def org_prefix(self, org_id: str) -> str:
        return self._prefixes[self.shard_of(org_id)]

    # -- per org ---------------------------------------------------------------------
    def cfg(self, org_id: str) -> str:
        """Hash: the org's configuration — plan allowances, seats, anchor day, AI switch,
        features (``f:``/``tf:``), teams (``t:``), seats (``s:``, limits ``sl:``),
        assistants (``as:``/``at:``). Read by every spend-path script in one HMGET."""
        return cfg_key(self.org_prefix(org_id), escape(org_id))

    def bal(self, org_id: str, meter: str) -> str:
        """Hash: every wallet (org, team, seat) of one org for one meter; see lib.lua.
        One hash per meter keeps a Reserve to a few HMGETs on one key per charge."""
        return bal_key(self.org_prefix(org_id), escape(org_id), escape(meter))

    def idem(self, org_id: str, key: str) -> str:
        """String: ``<reservation id>|<request fingerprint>`` — a retried Reserve with the
        same idempotency key finds its first answer here. Expires with the hold."""
        return idem_key(self.org_prefix(org_id), escape(org_id), escape(key))

    def org_parts(self, org_id: str) -> tuple[int, str, str]:
        """(shard, shard prefix, escaped org id): the parts of every key of the org, for a
        caller that builds several of them (the spend path, with the ``*_key`` functions
        below: the same names, the shard computed once)."""
        shard = zlib.crc32(org_id.encode("utf-8")) % self.shards
        return shard, self._prefixes[shard], escape(org_id)

    def purchases(self, org_id: str) -> str:
        """Hash: purchase id -> what it bought; makes TopUp idempotent."""
        return f"{self.org_prefix(org_id)}pur:{escape(org_id)}"

    # -- per shard -------------------------------------------------------------------
    def hold(self, reservation_id: str) -> str:
        """Hash: one hold (see lib.lua). The reservation id carries the shard."""
        return hold_key(self.prefix(self.shard_of_reservation(reservation_id)), reservation_id)

    def expiries(self, shard: int) -> str:
        """Sorted set: reservation id -> expiry (ms) of the shard's open holds (sweeper)."""
        return f"{self._prefixes[shard]}exp"

    def ledger(self, shard: int) -> str:
        """Stream: every state change of the shard, appended by the script that made it."""
        return f"{self._prefixes[shard]}ledger"

    def events(self, shard: int) -> str:
        """Stream: the shard's events (wallet.low, assistant.deactivated, …)."""
        return f"{self._prefixes[shard]}events"

    # -- global ----------------------------------------------------------------------
    def plan(self, name: str) -> str:
        """Hash: a plan's allowances, ``<meter>`` -> ``monthly:per_seat``. Not sharded:
        admin-only; UpsertOrg copies the allowances into the org's configuration."""
        return f"{self.ns}:plan:{escape(name)}"

    def plan_orgs(self, name: str) -> str:
        """Set: org ids on a plan, so a changed plan reaches each of its orgs."""
        return f"{self.ns}:planorgs:{escape(name)}"

    def seeding(self) -> str:
        """Set of the catalog seed's orgs being created: an org stays in it until all its
        teams, seats, assistants and top-ups are, so an interrupted seed is finished."""
        return f"{self.ns}:seeding"

    def sweeper(self) -> str:
        """String with a TTL: the sweeper lease. Whichever process of the fleet sets it
        first sweeps every shard for that interval; the others skip their tick."""
        return f"{self.ns}:sweeper"

    # -- reservation ids -------------------------------------------------------------
    def reservation_id(self, org_id: str, token: str) -> str:
        """``r<shard>.<32 hex>``: routes Commit/Refund/Extend to the shard without a lookup."""
        return f"r{self.shard_of(org_id)}.{token}"

    def shard_of_reservation(self, reservation_id: str) -> int:
        m = _RID.fullmatch(reservation_id)  # "$" alone would allow a final "\n"
        if not m or int(m.group(1)) >= self.shards:
            raise ValueError("malformed reservation id")
        return int(m.group(1))
