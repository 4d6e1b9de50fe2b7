"""Webhook delivery: one signed POST per event and URL, retried with exponential backoff.

The receiver checks ``X-Quotagate-Signature: sha256=<hex>``, the HMAC-SHA256 with the
shared secret of ``"<X-Quotagate-Timestamp>.<raw body>"`` (``verify`` does exactly that),
and should reject timestamps far from its clock (replays) and de-duplicate on the event id.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import random
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

USER_AGENT = "quotagate-notifier/1"


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str | bytes, timestamp: str, body: bytes, signature: str,
           tolerance_s: float | None = 300, now: float | None = None) -> bool:
    """What a receiver does: constant-time compare, and a timestamp within tolerance."""
    if tolerance_s is not None:
        try:
            skew = abs((time.time() if now is None else now) - int(timestamp))
        except ValueError:
            return False
        if skew > tolerance_s:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class DeliveryError(Exception):
    """One attempt failed: a connection error, a timeout or a non-2xx answer."""


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """One blocking POST (run it in a thread). Returns the status; raises DeliveryError."""
    u = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout_s)
    else:
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout_s)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(65536)
        status = resp.status
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a header
        raise DeliveryError(f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}")
    return status


@dataclass(frozen=True)
class RetryPolicy:
    base_ms: int = 500
    max_ms: int = 60_000
    attempts: int = 8

    def delay_s(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1-based): base·2^(n-1), capped,
        with "equal jitter" (half fixed, half random) so retries of many events spread."""
        d: float = min(self.max_ms, self.base_ms * (2 ** (attempt - 1))) / 1000
        return float(d / 2 + random.uniform(0, d / 2))


def header_value(v: str) -> str:
    """`v` as an HTTP header value: printable ASCII as it is (every id the scripts
    write), anything else percent-encoded (http.client refuses non-Latin-1 and CR/LF)."""
    return "".join(c if " " <= c <= "~" else urllib.parse.quote(c, safe="") for c in v)


#: POSTs in flight at once per URL; each URL has threads of its own, so a receiver that
#: hangs until the timeout holds up only its own deliveries (asyncio's default pool, of
#: min(32, cores + 4) threads, is shared with the SQLite sink and everything else)
THREADS_PER_URL = 16


class Sender:
    """Posts one body to one URL until it succeeds or the attempts run out."""

    def __init__(self, secret: str, policy: RetryPolicy, timeout_s: float,
                 wall: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.policy = policy
        self.timeout_s = timeout_s
        self.wall = wall
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def _pool(self, url: str) -> ThreadPoolExecutor:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = ThreadPoolExecutor(THREADS_PER_URL, "webhook")
        return pool

    def headers(self, body: bytes, event_id: str, event_type: str) -> dict[str, str]:
        ts = int(self.wall())
        return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                "X-Quotagate-Timestamp": str(ts),
                "X-Quotagate-Signature": sign(self.secret, ts, body),
                "X-Quotagate-Event-Id": header_value(event_id),
                "X-Quotagate-Event-Type": header_value(event_type)}

    async def send(self, url: str, body: bytes, event_id: str, event_type: str) -> str:
        """Returns "" when delivered, else the last error (after every attempt failed)."""
        error = ""
        for attempt in range(1, self.policy.attempts + 1):
            headers = self.headers(body, event_id, event_type)  # fresh timestamp each try
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool(url), post, url, body, headers, self.timeout_s)
                return ""
            except DeliveryError as e:
                error = str(e)
            if attempt < self.policy.attempts:
                await asyncio.sleep(self.policy.delay_s(attempt))
        return error or "failed"
