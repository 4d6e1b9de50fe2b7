"""A stop always ends: background loops whose cancellation a library swallowed still
stop, and a task that ignores cancellation altogether is reported, not waited on."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from quotagate import app as app_mod
from quotagate.app import App
from quotagate.settings import Settings
from quotagate.tasks import raise_if_cancelled


async def test_a_loop_whose_cancellation_was_swallowed_still_ends() -> None:
    """The shape of every background loop: a library catches the CancelledError and
    answers with an error of its own, which the loop logs and retries. The check at the
    top of each turn still ends it."""
    turns = 0
    started = asyncio.Event()

    async def loop() -> None:
        nonlocal turns
        while True:
            raise_if_cancelled()
            turns += 1
            started.set()
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # what a library that swallows it does
                pass

    task = asyncio.ensure_future(loop())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert task.cancelled()


async def test_stop_reports_a_task_that_ignores_cancellation_and_finishes(
        redis_server: Any, redis: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(app_mod, "STOP_TASKS_S", 0.5)
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", notify_in_process=False)).start()
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue  # ignores every cancellation

    stuck = asyncio.create_task(stubborn(), name="stubborn")
    app._tasks.append(stuck)
    try:
        with caplog.at_level(logging.ERROR, logger="quotagate"):
            await asyncio.wait_for(app.stop(), 30)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("stubborn" in m and "did not end" in m for m in errors), errors
        # every other task did end
        assert all(t.done() for t in app._tasks if t is not stuck)
    finally:
        release.set()
        await stuck
