"""The blocking client: the same calls as QuotaClient, for code without an event loop."""

from __future__ import annotations

import itertools
import logging
import time
from types import TracebackType
from typing import Any

import grpc

from quotagate.client import _common as c
from quotagate.v1 import quota_pb2_grpc

log = logging.getLogger("quotagate.client")


class SyncQuotaClient(c.Calls):
    """QuotaClient's blocking twin (see there): several connections, the same retries."""

    def __init__(self, target: str, *, api_key: str | None = None, channels: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, timeout: float = 2.0,
                 retries: int = 2) -> None:
        if channels < 1:
            raise ValueError("channels must be at least 1")
        opts = c.channel_options()
        self._channels = [grpc.secure_channel(target, credentials, options=opts)
                          if credentials else grpc.insecure_channel(target, options=opts)
                          for _ in range(channels)]
        self._stubs = [quota_pb2_grpc.QuotaServiceStub(ch) for ch in self._channels]
        self._next = itertools.cycle(range(channels))
        self._metadata = c.metadata(api_key)
        self.timeout, self.retries = timeout, retries

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> SyncQuotaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: Any) -> Any:
        attempts = 1 + (self.retries if name in c.REPEATABLE else 0)
        attempt = 1
        while True:
            stub = self._stubs[next(self._next)]
            try:
                return getattr(stub, name)(request, timeout=self.timeout,
                                           metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in c.RETRY or attempt >= attempts:
                    raise
            time.sleep(c.backoff(attempt))
            attempt += 1

    def reservation(self, subject: c.SubjectLike, charges: c.Amounts | None = None,
                    **kw: Any) -> SyncReservation:
        """`with client.reservation(who, {"message_tokens": 2000}) as hold:` (see
        QuotaClient.reservation)."""
        return SyncReservation(self, subject, charges, kw)


class SyncReservation(c.Outcome):
    _client: SyncQuotaClient

    def __enter__(self) -> SyncReservation:
        self.response = self._client.reserve(self._subject, self._charges, **self._kw)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        then = self.leaving(exc_type)
        if then is None:
            return
        what, arg = then
        if what == "commit":
            self.outcome = self._client.commit(self.reservation_id, arg)
            return
        try:
            self.outcome = self._client.refund(self.reservation_id, reason=arg)
        except grpc.RpcError as e:  # the block's own error matters more
            log.warning("refund of %s failed (%s); the hold expires after its TTL",
                        self.reservation_id, e.code().name)
