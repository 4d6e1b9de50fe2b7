"""Health is the sum of its parts: Redis answers and the scripts are loaded. Draining
(SIGTERM) reports NOT_SERVING before the server stops."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from quotagate.ledger.store import Ledger

log = logging.getLogger(__name__)

SERVICES = ("", "quotagate.v1.QuotaService", "quotagate.v1.AdminService")


class Health:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.servicer = health.aio.HealthServicer()
        self.serving: bool | None = None
        self.draining = False

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
            await self.update()
            await asyncio.sleep(interval_s)

    async def drain(self) -> None:
        self.draining = True
        for name in SERVICES:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.serving = False
