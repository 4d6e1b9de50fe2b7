"""`quotagate serve --workers N`: N server processes sharing one port (SO_REUSEPORT), each
with its own event loop and Redis pool. The parent is a small supervisor: it starts the
embedded Redis once (shared by all workers), picks the port when asked for port 0, runs
the background duties (sync, notify) and the metrics endpoint in worker 0 only, restarts
a worker that dies, and on SIGTERM/SIGINT stops them all (each drains) before stopping
the embedded Redis."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from quotagate import catalog
from quotagate.embedded import EmbeddedRedis
from quotagate.settings import Settings

log = logging.getLogger("quotagate.workers")

#: set for each worker: its index (0 runs the syncer, the notifier and /metrics)
INDEX_VAR = "QUOTAGATE_WORKER_INDEX"
#: set for each worker: where the workers keep their RPC counters (telemetry.RpcStats)
STATS_DIR_VAR = "QUOTAGATE_WORKER_STATS_DIR"
#: set for each worker when the Redis it is given is the embedded one this process runs
EMBEDDED_VAR = "QUOTAGATE_WORKER_REDIS_EMBEDDED"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, even by SIGKILL, so
    no worker outlives it (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _resolve_port(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if port != "0":
        return listen
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return f"{host}:{s.getsockname()[1]}"


def run_workers(settings: Settings, workers: int) -> int:
    catalog.load(settings.catalog)  # a bad catalog stops here (ConfigError), not in a loop
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir)
        redis_url = embedded.start()
    listen = _resolve_port(settings.listen)
    # the workers' RPC counters, one file each, summed by worker 0's /metrics
    stats_dir = tempfile.mkdtemp(prefix="quotagate-stats-")
    base = {**os.environ, "QUOTAGATE_LISTEN": listen, "QUOTAGATE_REDIS_URL": redis_url,
            "QUOTAGATE_REUSEPORT": "true", STATS_DIR_VAR: stats_dir}
    if embedded is not None:
        base[EMBEDDED_VAR] = "1"

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = {**base, INDEX_VAR: str(i)}
        if i > 0:  # one syncer and one notifier are enough; every worker serves and sweeps
            env["QUOTAGATE_SYNC_IN_PROCESS"] = "false"
            env["QUOTAGATE_NOTIFY_IN_PROCESS"] = "false"
        return subprocess.Popen([sys.executable, "-m", "quotagate", "serve", "--workers", "1"],
                                env=env, preexec_fn=_die_with_parent)

    procs = [spawn(i) for i in range(workers)]
    log.info("supervising %d workers on %s", workers, listen)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts: list[float] = []
    code = 0
    while not stopping:
        time.sleep(0.2)
        for i, p in enumerate(procs):
            if p.poll() is not None and not stopping:
                if p.returncode == 2:  # a configuration error: restarting cannot help
                    log.error("worker %d stopped on a configuration error", i)
                    stopping, code = True, 2
                    break
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 10 * workers:
                    log.error("workers keep dying; giving up")
                    stopping, code = True, 1
                    break
                log.warning("worker %d exited with %s; restarting", i, p.returncode)
                procs[i] = spawn(i)
        if embedded is not None and not stopping:
            embedded.revive()  # the shared Redis died (OOM killer, crash): from its AOF
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.grace_seconds + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    if embedded is not None:
        import asyncio

        asyncio.run(embedded.stop())
    shutil.rmtree(stats_dir, ignore_errors=True)
    return code
