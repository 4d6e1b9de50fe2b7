"""How long resolved holds and idempotency records stay (QUOTAGATE_RETENTION_SECONDS):
within it repeats answer the first result; past it Redis has let them go, so their memory
(a few hundred bytes per Reserve+Commit) does not pile up."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from quotagate.app import App
from quotagate.errors import NotFound
from quotagate.ledger.keys import escape, idem_key
from quotagate.ledger.model import Charge, Decision, HoldState, Subject
from quotagate.ledger.store import Ledger
from quotagate.settings import Settings

M = "message_tokens"


async def test_resolved_holds_and_idempotency_records_leave_after_the_retention(
        redis: Any, ledger: Ledger) -> None:
    led = Ledger(redis, ledger.catalog, ledger.clock, ledger.keys,
                 dataclasses.replace(ledger.opt, retain_ms=1500, default_ttl_s=1))
    try:
        await led.upsert_org("o", "pro")
        r = await led.reserve(Subject("o"), [Charge(M, 100)], idempotency_key="k")
        done = await led.commit(r.reservation_id, [Charge(M, 40)])
        hold = led.keys.hold(r.reservation_id)
        _, pre, org_e = led.keys.org_parts("o")
        idem = idem_key(pre, org_e, escape("k"))
        assert 0 < await redis.pttl(hold) <= 1500
        assert 0 < await redis.pttl(idem) <= 1000 + 1500  # the hold's TTL, then the retention
        # within it: the same answers
        assert (await led.commit(r.reservation_id, [Charge(M, 40)])).amounts == done.amounts
        again = await led.reserve(Subject("o"), [Charge(M, 100)], idempotency_key="k")
        assert again.replayed and again.reservation_id == r.reservation_id
        await asyncio.sleep(2.7)  # Redis's own clock expires them
        assert not await redis.exists(hold, idem)
        with pytest.raises(NotFound):
            await led.commit(r.reservation_id, [Charge(M, 40)])
        fresh = await led.reserve(Subject("o"), [Charge(M, 100)], idempotency_key="k")
        assert fresh.decision is Decision.GRANTED and fresh.reservation_id != r.reservation_id
        assert not fresh.replayed
        (b,) = await led.get_balance(Subject("o"), [M])
        assert (b.used, b.reserved) == (40, 100)  # nothing charged twice
        assert (await led.refund(fresh.reservation_id)).state is HoldState.REFUNDED
    finally:
        await led.aclose()


async def test_the_setting_reaches_the_ledger(redis_server: Any, tmp_path: Path) -> None:
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, data_dir=tmp_path,
                        metrics_listen="127.0.0.1:0", retention_seconds=3600)
    app = await App(settings).start()
    try:
        assert app.ledger.opt.retain_ms == 3_600_000
    finally:
        await app.stop()


def test_the_syncer_prunes_hold_snapshots_after_the_same_retention() -> None:
    """SQL keeps a resolved hold's snapshot (for `quotagate restore`) as long as Redis
    keeps the hold: the syncer's housekeeping cut-off is the same setting."""
    from quotagate.sync.syncer import SyncOptions

    assert SyncOptions.from_settings(Settings(retention_seconds=7 * 86400)).retain_ms == \
        7 * 86_400_000
