"""The notifier inside `serve` (App) and as `quotagate notify`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from events_util import xadd
from webhook_receiver import SECRET, Receiver

from quotagate import cli
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.errors import ConfigError
from quotagate.ledger.keys import Keys
from quotagate.settings import Settings
from redis_server import RedisServer


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def settings(redis_server: RedisServer, **kw: Any) -> Settings:
    return Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                    sweep_interval_ms=600_000, grace_seconds=0, notify_poll_ms=10,
                    webhook_retry_base_ms=1, webhook_retry_max_ms=5, **kw)


async def test_serve_runs_the_notifier(redis_server: RedisServer, redis: Any,
                                       clock: ManualClock, receiver: Receiver) -> None:
    app = await App(settings(redis_server, webhook_urls=[receiver.url],
                             webhook_secret=SECRET), clock=clock).start()
    try:
        assert app.notifier is not None
        eid = await xadd(redis, "wallet.low", "acme", {"meter": "message_tokens"})
        (got,) = await receiver.wait_for(1)
        assert got["id"] == eid and receiver.bad_signatures == 0
    finally:
        await app.stop()


async def test_notifier_off_in_process(redis_server: RedisServer, redis: Any,
                                       clock: ManualClock, receiver: Receiver) -> None:
    app = await App(settings(redis_server, webhook_urls=[receiver.url], webhook_secret=SECRET,
                             notify_in_process=False), clock=clock).start()
    try:
        assert app.notifier is None
    finally:
        await app.stop()


async def test_webhooks_need_a_secret(redis_server: RedisServer, redis: Any) -> None:
    with pytest.raises(ConfigError) as e:
        await App(settings(redis_server, webhook_urls=["http://127.0.0.1:9/x"])).start()
    assert e.value.field == "QUOTAGATE_WEBHOOK_SECRET"


def test_webhook_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_URLS", "http://a.example/h, https://b.example/h")
    assert Settings().webhook_urls == ["http://a.example/h", "https://b.example/h"]
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_URLS", "ftp://a")
    from quotagate.settings import load_settings

    with pytest.raises(ConfigError) as e:
        load_settings()
    assert e.value.field == "QUOTAGATE_WEBHOOK_URLS"


async def test_cli_notify_once(redis_server: RedisServer, redis: Any, receiver: Receiver,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    eid = await xadd(redis, "period.reset", "acme", keys=Keys(256))
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_URLS", receiver.url)
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_SECRET", SECRET)
    import asyncio

    rc = await asyncio.to_thread(cli.main, ["notify", "--once", "--redis-url",
                                            redis_server.url, "--log-level", "WARNING"])
    assert rc == 0
    assert receiver.ids() == [eid]


async def test_cli_notify_replays_the_dead_letters(
        redis_server: RedisServer, redis: Any, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await redis.xadd("qg:deadletter", {"id": "ev-1", "type": "wallet.low", "org": "acme",
                                       "attrs": '{"meter": "m"}', "at": "1762732800000",
                                       "url": receiver.url, "error": "HTTP 503"})
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_URLS", receiver.url)
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_SECRET", SECRET)
    import asyncio

    rc = await asyncio.to_thread(cli.main, ["notify", "--replay-deadletter", "--redis-url",
                                            redis_server.url, "--log-level", "WARNING"])
    assert rc == 0
    (got,) = await receiver.wait_for(1)
    assert (got["id"], got["type"], got["attributes"]) == ("ev-1", "wallet.low", {"meter": "m"})
    assert await redis.xlen("qg:deadletter") == 0


def test_cli_notify_needs_webhooks(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QUOTAGATE_WEBHOOK_URLS", raising=False)
    assert cli.main(["notify", "--redis-url", "redis://127.0.0.1:9"]) == 2
    assert "QUOTAGATE_WEBHOOK_URLS" in capsys.readouterr().err
