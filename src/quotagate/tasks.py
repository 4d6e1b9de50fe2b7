"""Background loops that stop when told to."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError when the running task was asked to stop. A library that
    catches a cancellation and answers with an error of its own (a connection error the
    loop logs and retries) would otherwise keep a background loop going for ever, and
    whoever waits for it to end (App.stop) waits for ever too. Call it once per turn."""
    me = asyncio.current_task()
    if me is not None and me.cancelling():
        raise asyncio.CancelledError
