"""A real HTTP server (http.server in a thread, port 0) that receives the webhooks and
checks each signature the way a customer's endpoint would."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quotagate.events.webhook import verify

SECRET = "whsec-test-0123456789"


class Receiver:
    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []  # validly signed, accepted bodies
        self.headers: list[dict[str, str]] = []
        self.bad_signatures = 0
        self.requests = 0
        self.fail_first = 0  # answer 500 to this many requests first
        self.always_fail = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = verify(receiver.secret, self.headers.get("X-Quotagate-Timestamp", ""),
                            body, self.headers.get("X-Quotagate-Signature", ""))
                with receiver.lock:
                    receiver.requests += 1
                    if not ok:
                        receiver.bad_signatures += 1
                        status = 401
                    elif receiver.always_fail or receiver.fail_first > 0:
                        receiver.fail_first -= 1
                        status = 500
                    else:
                        receiver.events.append(json.loads(body))
                        receiver.headers.append(dict(self.headers))
                        status = 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/quotagate"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for e in self.events]

    async def wait_for(self, n: int, within: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.events) >= n:
                    return list(self.events)
            await asyncio.sleep(0.01)
        raise AssertionError(f"got {len(self.events)} of {n} webhooks")
