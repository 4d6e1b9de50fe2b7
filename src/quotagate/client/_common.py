"""What the async and the sync client share: request building, the retry rule, and
when and where a watch's stream is opened again."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from quotagate.ledger.model import Subject
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

SubjectLike = common_pb2.Subject | Subject
Amounts = Mapping[str, int]

#: codes after which a call is sent again: it did not reach the server, or it may have
#: and repeating it answers the same (Reserve repeats its idempotency key; Commit and
#: Refund of a resolved hold answer its outcome)
RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: the calls that may be repeated (Extend adds to a hold: never repeated)
REPEATABLE = frozenset({"Reserve", "Commit", "Refund", "Check", "GetBalance"})
#: WatchEvents' initial metadata naming where the stream starts (the server's
#: quotagate.server.admin.CURSOR_HEADER)
CURSOR_HEADER = "quotagate-cursor"


class ClientClosedError(RuntimeError):
    """A call on a client that was closed (its connections are gone: make a new one)."""

    def __init__(self) -> None:
        super().__init__("client is closed")


def subject_pb(s: SubjectLike) -> common_pb2.Subject:
    if isinstance(s, common_pb2.Subject):
        return s
    return common_pb2.Subject(org_id=s.org_id, team_id=s.team_id, seat_id=s.seat_id,
                              assistant_id=s.assistant_id)


def charges_pb(amounts: Amounts | None) -> list[common_pb2.Charge]:
    return [common_pb2.Charge(meter=m, amount=a) for m, a in (amounts or {}).items()]


def reserve_request(subject: SubjectLike, charges: Amounts | None = None, *,
                    action: str = "", feature: str = "", ttl_seconds: int = 0,
                    allow_partial: bool = False, labels: Mapping[str, str] | None = None,
                    idempotency_key: str | None = None) -> quota_pb2.ReserveRequest:
    """The ReserveRequest; without an `idempotency_key` a new one is made (sending this
    request again gets the hold it made, never a second one)."""
    return quota_pb2.ReserveRequest(
        subject=subject_pb(subject), charges=charges_pb(charges), action=action,
        feature=feature, ttl_seconds=ttl_seconds, allow_partial=allow_partial,
        labels=dict(labels or {}), idempotency_key=idempotency_key or str(uuid.uuid4()))


def commit_request(reservation_id: str, actual: Amounts | None = None,
                   labels: Mapping[str, str] | None = None) -> quota_pb2.CommitRequest:
    if actual is not None and not actual:
        raise ValueError("actual is empty, which would charge everything held: pass None "
                         "for that, or each meter with 0 to charge nothing")
    return quota_pb2.CommitRequest(reservation_id=reservation_id, actual=charges_pb(actual),
                                   labels=dict(labels or {}))


def refund_request(reservation_id: str, amount: Amounts | None = None,
                   reason: str = "") -> quota_pb2.RefundRequest:
    if amount is not None and not amount:
        raise ValueError("amount is empty, which would refund everything: pass None "
                         "for that")
    return quota_pb2.RefundRequest(reservation_id=reservation_id, amount=charges_pb(amount),
                                   reason=reason)


def watch_status_request(org_id: str, assistant_ids: Sequence[str]
                         ) -> quota_pb2.WatchStatusRequest:
    return quota_pb2.WatchStatusRequest(org_id=org_id, assistant_ids=list(assistant_ids))


class Reopening:
    """Whether, and after how long, a watch opens its stream again: after UNAVAILABLE (a
    renewed connection, a restarted server) while `reconnect`, backing off from 50 ms
    over failures in a row (a message received starts the count again)."""

    def __init__(self, reconnect: bool) -> None:
        self.reconnect, self.failures = reconnect, 0

    def received(self) -> None:
        self.failures = 0

    def after(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to wait before opening it again; None: raise the stream's error."""
        if not self.reconnect or code != grpc.StatusCode.UNAVAILABLE:
            return None
        self.failures += 1
        return backoff(min(self.failures, 6))


class EventCursor:
    """Where a WatchEvents stream (re)opens: after cursor `after`, then after the last
    event received; a stream cut before its first event resumes from where it started
    (the server's `quotagate-cursor` initial metadata), so what happened since is
    replayed: no event is missed or received twice."""

    def __init__(self, org_id: str, after: str) -> None:
        self.org_id, self.last = org_id, after

    def request(self) -> admin_pb2.WatchEventsRequest:
        return admin_pb2.WatchEventsRequest(org_id=self.org_id, after=self.last)

    def started(self, initial_metadata: Any) -> None:
        if self.last:
            return
        for k, v in initial_metadata or ():
            if k == CURSOR_HEADER and v:
                self.last = v

    def seen(self, msg: admin_pb2.WatchEventsResponse) -> admin_pb2.Event:
        self.last = msg.event.cursor or self.last
        return msg.event


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, …): 50 ms doubling, with jitter."""
    return float(0.05 * (2 ** (attempt - 1)) * (0.5 + random.random()))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def channel_options() -> list[tuple[str, Any]]:
    # each channel its own connection: the server's workers are dealt connections, not
    # calls (README: "Open several connections")
    return [("grpc.use_local_subchannel_pool", 1)]


def reason_name(code: int) -> str:
    """DENY_REASON_INSUFFICIENT_BALANCE -> "insufficient_balance"; "" when granted."""
    if not code:
        return ""
    try:
        name = str(common_pb2.DenyReason.Name(code))
    except ValueError:  # a reason added to the API after this client was built
        return f"unknown_{code}"
    return name.removeprefix("DENY_REASON_").lower()


class Calls:
    """The QuotaService calls, built once for both clients: each returns `self._call(name,
    request)`, which the async client awaits and the sync client runs."""

    #: set by close(): the blocking client takes no more calls (ClientClosedError); the
    #: asyncio one opens new connections at its next call (a grpc.aio channel belongs to
    #: one event loop, and a client may outlive the loop it first ran on)
    closed = False

    def _ensure_open(self) -> None:
        if self.closed:
            raise ClientClosedError()

    def _call(self, name: str, request: Any) -> Any:
        raise NotImplementedError

    def reserve(self, subject: SubjectLike, charges: Amounts | None = None, *,
                action: str = "", feature: str = "", ttl_seconds: int = 0,
                allow_partial: bool = False, labels: Mapping[str, str] | None = None,
                idempotency_key: str | None = None) -> Any:
        """Hold `charges` ({meter: amount}) or the price of `action`: a ReserveResponse.
        Without an `idempotency_key` a new one is made, and kept across this call's
        retries."""
        return self._call("Reserve", reserve_request(
            subject, charges, action=action, feature=feature, ttl_seconds=ttl_seconds,
            allow_partial=allow_partial, labels=labels, idempotency_key=idempotency_key))

    def commit(self, reservation_id: str, actual: Amounts | None = None,
               labels: Mapping[str, str] | None = None) -> Any:
        """Charge what was used ({meter: amount}); None: exactly what was held. An empty
        mapping is refused (ValueError): on the wire it would charge everything held; to
        charge nothing name each meter with 0."""
        return self._call("Commit", commit_request(reservation_id, actual, labels))

    def refund(self, reservation_id: str, amount: Amounts | None = None,
               reason: str = "") -> Any:
        """Give the hold back (None: all of it; after a Commit at most what it charged).
        An empty mapping is refused (ValueError): on the wire it would give back all."""
        return self._call("Refund", refund_request(reservation_id, amount, reason))

    def extend(self, reservation_id: str, additional: Amounts | None = None,
               ttl_seconds: int = 0) -> Any:
        """Hold more, or longer (never sent twice: a repeat would add twice)."""
        return self._call("Extend", quota_pb2.ExtendRequest(
            reservation_id=reservation_id, additional=charges_pb(additional),
            ttl_seconds=ttl_seconds))

    def check(self, subject: SubjectLike, meter: str = "", feature: str = "") -> Any:
        """Whether the subject could spend now (nothing held): a CheckResponse."""
        return self._call("Check", quota_pb2.CheckRequest(
            subject=subject_pb(subject), meter=meter, feature=feature))

    def get_balance(self, subject: SubjectLike, meters: Sequence[str] = ()) -> Any:
        """A GetBalanceResponse: `.balances`, one MeterBalance per meter."""
        return self._call("GetBalance", quota_pb2.GetBalanceRequest(
            subject=subject_pb(subject), meters=list(meters)))


class Outcome:
    """A Reserve's answer, as `reservation()` hands it to the block."""

    def __init__(self, client: Any, subject: SubjectLike, charges: Amounts | None,
                 kw: dict[str, Any]) -> None:
        self._client, self._subject, self._charges, self._kw = client, subject, charges, kw
        self.response: quota_pb2.ReserveResponse | None = None
        self.actual: dict[str, int] | None = None
        #: the Commit's or Refund's answer, once the block is left
        self.outcome: Any = None

    @property
    def granted(self) -> bool:
        return self.response is not None and \
            self.response.decision == common_pb2.DECISION_GRANTED

    @property
    def silent(self) -> bool:
        """Denied because the assistant is inactive: hide it, tell the user nothing."""
        return self.response is not None and self.response.silent

    @property
    def reason(self) -> str:
        return reason_name(self.response.reason) if self.response is not None else ""

    @property
    def reservation_id(self) -> str:
        return self.response.reservation_id if self.response is not None else ""

    def use(self, actual: Amounts) -> None:
        """What the work really used ({meter: amount}; a held meter left out used 0);
        committed when the block ends. `use({})`: nothing was used. A meter the hold
        does not have is refused here (ValueError: the block fails, so the hold is
        refunded), not at the Commit, which would leave the hold to expire uncharged."""
        if self.response is not None:
            held = {g.meter for g in self.response.granted}
            extra = sorted(set(actual) - held)
            if extra:
                raise ValueError(f"use() names meters this hold does not have: {extra} "
                                 f"(held: {sorted(held)})")
        self.actual = dict(actual)

    def leaving(self, exc_type: type[BaseException] | None) -> tuple[str, Any] | None:
        """What leaving the block calls: ("refund", reason) after an exception, ("commit",
        actual) otherwise, None when nothing was held."""
        if not self.granted:
            return None
        if exc_type is not None:
            return "refund", f"failed: {exc_type.__name__}"
        if self.actual is not None and not self.actual:
            # nothing used: an empty `actual` on the wire would charge everything held
            assert self.response is not None
            return "commit", {g.meter: 0 for g in self.response.granted} or None
        return "commit", self.actual
