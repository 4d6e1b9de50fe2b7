"""API keys, roles and org scopes (DESIGN §6): a grpc.aio server interceptor, plus the TLS
server credentials.

Keys live in a TOML or JSON file (``QUOTAGATE_API_KEYS_FILE``) that holds only the
SHA-256 of each key, never the key::

    [[keys]]
    name = "chat-runtime"          # shows up in logs
    sha256 = "9f86d08…"            # hex SHA-256 of the key: printf %s "$KEY" | sha256sum
    role = "runtime"               # runtime | team_lead | admin
    org = "acme"                   # one org id, or "*" for every org
    # team = "support"             # team_lead only: the team whose seats it may set

A caller sends ``authorization: Bearer <key>``. The key's SHA-256 is compared with every
entry by ``hmac.compare_digest`` (no early exit), so timing tells nothing about which
bytes matched.

Rules:

- ``grpc.health.v1.Health`` and server reflection are open.
- ``QuotaService``: any role, for an org in the key's scope. The org is
  ``subject.org_id`` (Reserve, Check, GetBalance), ``org_id`` (WatchStatus), or, for
  Commit / Refund / Extend which carry only ``reservation_id``, the org recorded in the
  hold itself (hash field ``o``). Those lookups are cached: a Reserve answered by this
  process remembers reservation id → org, so the usual Reserve → Commit costs no extra
  round trip; otherwise one HGET before the script. An unknown or malformed reservation
  id is passed on, and the servicer answers NOT_FOUND / INVALID_ARGUMENT as without auth.
- ``AdminService``: role ``admin`` with the request's ``org_id`` in scope (UpsertPlan,
  which has no org, needs ``org = "*"``); a ``team_lead`` may call UpsertSeat for its
  own team only (``team_id`` = the key's team, and a seat that exists must already be in
  that team, so it cannot pull a seat over from another team).
- Envoy's ``RateLimitService``: any role, with the ``org_id`` entry of every descriptor
  in the key's scope (Envoy sends the key as ``initial_metadata`` of its gRPC service).
- Any other service: an ``admin`` key scoped to ``"*"``.

No or unknown key, or two authorization headers: UNAUTHENTICATED. A known key that may
not do this: PERMISSION_DENIED. A request that does not decode runs nothing: after the key
(and its role, for AdminService) it is answered INVALID_ARGUMENT. A server stream
(WatchStatus, WatchEvents) is checked again at its next message once the keys were
reloaded, so a revoked or re-scoped key's stream ends there.

A key listed twice (the same sha256) and a field that is not a string are ConfigErrors
naming QUOTAGATE_API_KEYS_FILE.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import tomllib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from quotagate import telemetry
from quotagate.errors import (
    ConfigError,
    InvalidArgument,
    PermissionDenied,
    QuotagateError,
    Unauthenticated,
    Unavailable,
)
from quotagate.ledger.keys import Keys, escape, unescape
from quotagate.server.decoding import Undecodable
from quotagate.server.status import to_status

log = logging.getLogger(__name__)

KEYS_VAR = "QUOTAGATE_API_KEYS_FILE"
ROLES = ("runtime", "team_lead", "admin")
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
        "/grpc.reflection.v1.ServerReflection/")
QUOTA = "/quotagate.v1.QuotaService/"
ADMIN = "/quotagate.v1.AdminService/"
RLS = "/envoy.service.ratelimit.v3.RateLimitService/"
BY_RESERVATION = frozenset({"Commit", "Refund", "Extend"})
RID_CACHE = 100_000
#: how often the server looks at the API keys file for a change
KEYS_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: bytes = field(repr=False)
    role: str
    org: str
    team: str = ""

    def covers(self, org_id: str) -> bool:
        return self.org == "*" or self.org == org_id


# -- configuration ----------------------------------------------------------------------
def _entry(i: int, e: Any) -> ApiKey:
    where = f"keys[{i}]"
    if not isinstance(e, dict):
        raise ConfigError(f"{where} must be a table/object", KEYS_VAR)
    if "key" in e or "secret" in e:
        raise ConfigError(f"{where}: store the sha256 of the key, never the key", KEYS_VAR)
    unknown = set(e) - {"name", "sha256", "role", "org", "team"}
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {sorted(unknown)}", KEYS_VAR)
    for f in sorted(e):  # `org = ["a", "b"]` is no scope of two orgs: refused, not str()-ed
        if not isinstance(e[f], str):
            raise ConfigError(f"{where}.{f} must be a string", KEYS_VAR)
    digest = str(e.get("sha256", "")).strip().lower()
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}.sha256 must be 64 hex digits (SHA-256 of the key)",
                          KEYS_VAR)
    role = str(e.get("role", ""))
    if role not in ROLES:
        raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}", KEYS_VAR)
    org = str(e.get("org", ""))
    if not org:
        raise ConfigError(f"{where}.org is required (an org id, or \"*\")", KEYS_VAR)
    team = str(e.get("team", ""))
    if role == "team_lead" and not team:
        raise ConfigError(f"{where}.team is required for a team_lead key", KEYS_VAR)
    if role == "team_lead" and org == "*":  # its team is a team of one org
        raise ConfigError(f"{where}.org of a team_lead key must be one org, not \"*\"",
                          KEYS_VAR)
    return ApiKey(str(e.get("name", f"key{i}")), raw, role, org, team)


def load_keys(path: str | Path, allow_none: bool = False) -> list[ApiKey]:
    """Parse a keys file (TOML ``[[keys]]``, or JSON: a list or ``{"keys": [...]}``).
    `allow_none`: a file that says explicitly that there are no keys (``keys = []``, a
    JSON ``[]`` or ``{"keys": []}``) gives none; an empty file or one without ``keys``
    is still refused (a file being written, or the wrong file)."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}", KEYS_VAR) from None
    data: Any
    try:
        if p.suffix.lower() == ".json" or text.lstrip().startswith(("[{", "{", "[\n{")):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p} is neither valid TOML nor JSON: {e}", KEYS_VAR) from None
    entries = data.get("keys") if isinstance(data, dict) else data
    if allow_none and entries == []:
        return []
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{p} defines no keys", KEYS_VAR)
    keys = [_entry(i, e) for i, e in enumerate(entries)]
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):  # one key twice: which role and org would depend on order
        if k.sha256 in first:
            raise ConfigError(f"keys[{i}] has the same sha256 as keys[{first[k.sha256]}]: "
                              "list each key once", KEYS_VAR)
        first[k.sha256] = i
    return keys


class KeyRing:
    """The configured keys; finds the one a bearer token belongs to. Made from a file
    (`from_file`), it reloads it when it changes (`reload_if_changed`, which the server
    calls every KEYS_POLL_SECONDS): keys are rotated by editing the file, or by
    Kubernetes updating a mounted Secret, without a restart. A file that no longer parses,
    is empty or is gone is logged and the keys in force are kept; one that says
    ``keys = []`` revokes every key."""

    def __init__(self, keys: Iterable[ApiKey], path: str | Path | None = None) -> None:
        self.keys = tuple(keys)
        self.path = Path(path) if path else None
        self._stamp = self._stat()
        self._waiters: set[asyncio.Future[None]] = set()

    def changed(self) -> asyncio.Future[None]:
        """A future the next reload that changes the keys resolves (open streams wait on
        it beside their next message, so an idle one is checked again at once)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        fut.add_done_callback(self._waiters.discard)
        return fut

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        return cls(load_keys(path), path)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()  # follows a Secret's symlinks to the current data
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed since it was last read; True when the keys
        in force changed."""
        stamp = self._stat()
        if self.path is not None and stamp is None and self._stamp is not None:
            log.error("API keys file %s is gone: the keys in force stay until it is back "
                      "(to revoke every key, write `keys = []` into it)", self.path)
            self._stamp = None  # logged once per disappearance
        if self.path is None or stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = tuple(load_keys(self.path, allow_none=True))
        except ConfigError as e:
            log.error("API keys file %s not reloaded, the keys in force stay: %s",
                      self.path, e)
            return False
        if keys == self.keys:
            return False
        self.keys = keys
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        if keys:
            log.warning("API keys reloaded from %s: %d key(s)", self.path, len(keys))
        else:
            log.error("API keys file %s says there are no keys: every call is refused "
                      "(UNAUTHENTICATED) until it lists some", self.path)
        return True

    def authenticate(self, token: str) -> ApiKey | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: ApiKey | None = None
        for k in self.keys:  # always the whole list, constant-time per entry
            if hmac.compare_digest(digest, k.sha256) and found is None:
                found = k
        return found


def keyring_for(settings: Any) -> KeyRing | None:
    """The key ring of the settings. None (auth off) is allowed on loopback only."""
    if settings.api_keys_file:
        return KeyRing.from_file(settings.api_keys_file)
    if not settings.loopback:
        raise ConfigError(
            f"listening on {settings.listen} needs API keys: set {KEYS_VAR} "
            "(auth may be off only on loopback)", KEYS_VAR)
    log.warning("authentication is off (no %s): acceptable on loopback only", KEYS_VAR)
    return None


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS when QUOTAGATE_TLS_CERT and _KEY are set; mTLS when _CLIENT_CA is set too."""
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if not cert and not key:
        if ca:
            raise ConfigError("needs QUOTAGATE_TLS_CERT and QUOTAGATE_TLS_KEY",
                              "QUOTAGATE_TLS_CLIENT_CA")
        return None
    if not cert or not key:
        raise ConfigError("TLS needs both QUOTAGATE_TLS_CERT and QUOTAGATE_TLS_KEY",
                          "QUOTAGATE_TLS_KEY" if cert else "QUOTAGATE_TLS_CERT")

    def read(path: str, var: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}", var) from None

    chain = read(cert, "QUOTAGATE_TLS_CERT")
    private = read(key, "QUOTAGATE_TLS_KEY")
    roots = read(ca, "QUOTAGATE_TLS_CLIENT_CA") if ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


# -- the interceptor -----------------------------------------------------------------
def bearer(metadata: Sequence[Any] | None) -> str:
    """The key of the one `authorization: Bearer <key>` header; "" when there is none.
    Two authorization headers are refused (which one counts would be up to whoever added
    the second, a proxy or the caller)."""
    values = [item[1] for item in metadata or () if item[0].lower() == "authorization"]
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header: send exactly one")
    for v in values:
        value = v.decode() if isinstance(v, bytes) else str(v)
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    return ""


class Authorizer:
    """Decides whether a key may make a call (the rules of the module docstring)."""

    def __init__(self, keyring: KeyRing, redis: Any, keys: Keys) -> None:
        self.keyring = keyring
        self.redis = redis
        self.keys = keys
        self._rid_org: OrderedDict[str, str] = OrderedDict()

    def authenticate(self, metadata: Sequence[Any] | None) -> ApiKey:
        token = bearer(metadata)
        if not token:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <key>'")
        key = self.keyring.authenticate(token)
        if key is None:
            raise Unauthenticated("unknown API key")
        return key

    def _remember(self, rid: str, org: str) -> None:
        self._rid_org[rid] = org
        self._rid_org.move_to_end(rid)
        while len(self._rid_org) > RID_CACHE:
            self._rid_org.popitem(last=False)

    async def _hold_org(self, rid: str) -> str | None:
        """The org of a reservation, or None when it does not exist (or is malformed)."""
        org = self._rid_org.get(rid)
        if org is not None:
            return org
        try:
            key = self.keys.hold(rid)
        except ValueError:
            return None
        try:
            raw = await self.redis.hget(key, "o")
        except Exception as e:  # connection trouble: the call could not run either
            raise Unavailable(f"redis unreachable: {e}") from e
        if raw is None:
            return None
        org = unescape(raw.decode() if isinstance(raw, bytes) else str(raw))
        self._remember(rid, org)
        return org

    @staticmethod
    def _scope(key: ApiKey, org: str, field_name: str) -> None:
        if not org:
            raise InvalidArgument("is required", field_name)
        if not key.covers(org):
            raise PermissionDenied(f"API key {key.name!r} is not allowed for org {org!r}")

    async def authorize(self, key: ApiKey, method: str, request: Any) -> None:
        service, _, name = method.rpartition("/")
        service += "/"
        if request.__class__ is Undecodable:  # nothing of it runs: INVALID_ARGUMENT
            if service == ADMIN and key.role != "admin" and not (
                    key.role == "team_lead" and name == "UpsertSeat"):
                raise PermissionDenied(f"{name} needs an admin API key (key {key.name!r} "
                                       f"is {key.role})")
            return
        if service == QUOTA:
            if name in BY_RESERVATION:
                if key.org == "*":
                    return
                org = await self._hold_org(request.reservation_id)
                if org is not None and not key.covers(org):
                    raise PermissionDenied(
                        f"API key {key.name!r} is not allowed for this reservation's org")
                return
            if hasattr(request, "subject"):
                self._scope(key, request.subject.org_id, "subject.org_id")
            else:
                self._scope(key, getattr(request, "org_id", ""), "org_id")
            return
        if service == ADMIN:
            has_org = hasattr(request, "org_id")
            if key.role == "admin":
                if has_org:
                    self._scope(key, request.org_id, "org_id")
                elif key.org != "*":
                    raise PermissionDenied(f"{name} needs an admin key scoped to \"*\"")
                return
            if key.role == "team_lead" and name == "UpsertSeat":
                self._scope(key, request.org_id, "org_id")
                if request.team_id != key.team:
                    raise PermissionDenied(
                        f"team lead key {key.name!r} may set seats of team {key.team!r} only")
                await self._seat_in_team(key, request.org_id, request.seat_id)
                return
            raise PermissionDenied(f"{name} needs an admin API key (key {key.name!r} is "
                                   f"{key.role})")
        if service == RLS:
            for i, d in enumerate(request.descriptors):
                org = next((e.value for e in d.entries if e.key == "org_id"), "")
                self._scope(key, org, f"descriptors[{i}].org_id")
            return
        if not (key.role == "admin" and key.org == "*"):
            raise PermissionDenied(f"{method} needs an admin key scoped to \"*\"")

    async def _seat_in_team(self, key: ApiKey, org: str, seat: str) -> None:
        """A team lead may not move a seat of another team into its own."""
        if not seat:
            return  # the servicer answers INVALID_ARGUMENT
        try:
            current = await self.redis.hget(self.keys.cfg(org), "s:" + escape(seat))
        except Exception as e:
            raise Unavailable(f"redis unreachable: {e}") from e
        if current is None:
            return  # a new seat, in the key's team
        team = current.decode() if isinstance(current, bytes) else str(current)
        if team != escape(key.team):
            raise PermissionDenied(f"seat {seat!r} belongs to another team")

    def observe(self, method: str, request: Any, response: Any) -> None:
        """Remember reservation id -> org from a granted Reserve (saves a lookup later)."""
        if method == QUOTA + "Reserve":
            rid = getattr(response, "reservation_id", "")
            if rid:
                self._remember(rid, request.subject.org_id)


Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each handler so the check sees the deserialized request."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.auth = authorizer

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN):
            return handler
        metadata = handler_call_details.invocation_metadata
        if handler.request_streaming:  # none of ours; only an admin of every org
            return self._streaming_request(handler, method, metadata)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(handler.unary_unary, method, metadata),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    async def _check(self, method: str, metadata: Any, request: Any,
                     context: grpc.aio.ServicerContext) -> None:
        try:
            key = self.auth.authenticate(metadata)
            await self.auth.authorize(key, method, request)
        except QuotagateError as e:
            log.debug("auth: %s refused: %s", method, e)
            status = to_status(e)
            telemetry.refused(method, status.code)
            await context.abort_with_status(status)

    def _unary_unary(self, inner: Handler, method: str, metadata: Any) -> Handler:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(method, metadata, request, context)
            response = inner(request, context)
            if inspect.isawaitable(response):
                response = await response
            self.auth.observe(method, request, response)
            return response

        return behavior

    def _unary_stream(self, inner: Handler, method: str, metadata: Any) -> Handler:
        async def behavior(request: Any, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[Any]:
            await self._check(method, metadata, request, context)
            stream = inner(request, context)
            if hasattr(stream, "__aiter__"):
                ring = self.auth.keyring
                keys = ring.keys
                messages = stream.__aiter__()
                nxt: asyncio.Future[Any] | None = None
                reload = ring.changed()
                try:
                    while True:
                        if nxt is None:
                            nxt = asyncio.ensure_future(messages.__anext__())
                        await asyncio.wait((nxt, reload),
                                           return_when=asyncio.FIRST_COMPLETED)
                        if ring.keys is not keys:  # reloaded: a revoked key gets no more,
                            keys = ring.keys      # idle or not
                            await self._check(method, metadata, request, context)
                        if reload.done():
                            reload = ring.changed()
                        if not nxt.done():
                            continue
                        try:
                            msg = nxt.result()
                        except StopAsyncIteration:
                            break
                        nxt = None
                        yield msg
                finally:
                    reload.cancel()
                    if nxt is not None and not nxt.done():
                        nxt.cancel()
                        try:
                            await nxt
                        except (asyncio.CancelledError, Exception):
                            pass  # the stream is being ended: what it would have said
                    if hasattr(stream, "aclose"):
                        await stream.aclose()
            elif inspect.isawaitable(stream):  # a handler that writes with context.write
                await stream
            else:
                for msg in stream:
                    yield msg

        return behavior

    def _streaming_request(self, handler: grpc.RpcMethodHandler, method: str,
                           metadata: Any) -> grpc.RpcMethodHandler:
        try:
            key = self.auth.authenticate(metadata)
            if key.role == "admin" and key.org == "*":
                return handler
            err: QuotagateError = PermissionDenied(f"{method} needs an admin key scoped to *")
        except QuotagateError as e:
            err = e

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(to_status(err))

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

