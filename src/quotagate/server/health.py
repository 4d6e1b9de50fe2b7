"""Health is the sum of its parts: Redis answers and the scripts are loaded. Draining
(SIGTERM) reports NOT_SERVING before the server stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from quotagate.ledger.store import Ledger
from quotagate.tasks import raise_if_cancelled

log = logging.getLogger(__name__)

SERVICES = ("", "quotagate.v1.QuotaService", "quotagate.v1.AdminService")
#: Reports the durable ledger: NOT_SERVING while SQL lags more than the alert threshold.
#: The sidecar keeps serving (entries wait in Redis); this is for alerting and probes.
SYNC_SERVICE = "quotagate.v1.Sync"

LagSource = Callable[[], dict[int, tuple[int, float]]]


class Health:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.servicer = health.aio.HealthServicer()
        self.serving: bool | None = None
        self.draining = False
        self.sync_lag: LagSource | None = None
        self.sync_alert_seconds = 60.0
        self.sync_ok: bool | None = None

    def details(self) -> dict[str, object]:
        """What health knows, for logs and operators: components and sync lag per shard."""
        lag = self.sync_lag() if self.sync_lag else {}
        behind = {s: v for s, v in lag.items() if v[0]}
        return {"serving": self.serving, "draining": self.draining,
                "sync_entries_waiting": sum(v[0] for v in lag.values()),
                "sync_seconds_behind": max((v[1] for v in lag.values()), default=0.0),
                "sync_lag_by_shard": {s: {"entries": n, "seconds": round(a, 1)}
                                      for s, (n, a) in sorted(behind.items())}}

    async def _update_sync(self) -> None:
        if self.sync_lag is None:
            return
        d = self.details()
        ok = float(d["sync_seconds_behind"]) <= self.sync_alert_seconds  # type: ignore[arg-type]
        if ok != self.sync_ok:
            await self.servicer.set(SYNC_SERVICE, health_pb2.HealthCheckResponse.SERVING if ok
                                    else health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.sync_ok is not None or not ok:
                log.warning("health: sync %s: %s", "caught up" if ok else "lagging", d)
            self.sync_ok = ok

    async def probe(self) -> bool:
        """Redis answers and every script is in its script cache (reloads them if not)."""
        try:
            if not await self.ledger.ping():
                return False
            if not await self.ledger.scripts.loaded():
                await self.ledger.scripts.load_all()
            return True
        except Exception as e:  # any failure means not serving; say why once
            log.debug("health probe failed: %s", e)
            return False

    async def update(self) -> bool:
        await self._update_sync()
        ok = (not self.draining) and await self.probe()
        if ok != self.serving:
            status = (health_pb2.HealthCheckResponse.SERVING if ok
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in SERVICES:
                await self.servicer.set(name, status)
            if self.serving is not None:
                log.warning("health: %s", "SERVING" if ok else "NOT_SERVING")
            self.serving = ok
        return ok

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            raise_if_cancelled()  # probe() turns every failure into "not serving"
            await self.update()
            await asyncio.sleep(interval_s)

    async def drain(self) -> None:
        self.draining = True
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.serving = False
