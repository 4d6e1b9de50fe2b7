"""SQL fixtures for the sync tests: every test runs against SQLite and PostgreSQL.

PostgreSQL: `QUOTAGATE_TEST_POSTGRES_URL` (default postgresql://postgres@127.0.0.1:5432/test);
each test gets its own schema (search_path in the URL), dropped afterwards. Unreachable:
the postgres half fails when `CI` is set, else it is skipped with the reason.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import psycopg
import pytest

from conftest import Grpc
from quotagate.app import App
from quotagate.clock import ManualClock
from quotagate.ledger.store import Ledger
from quotagate.settings import Settings
from quotagate.sync.sink import Sink, open_sink
from quotagate.sync.syncer import Syncer, SyncOptions

PG_URL = os.environ.get("QUOTAGATE_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sink_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'quotagate.db'}"
        return
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        msg = f"PostgreSQL at {PG_URL} unreachable (QUOTAGATE_TEST_POSTGRES_URL): {e}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    schema = f"qgt_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield _with_schema(PG_URL, schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def dead_url(backend: str, tmp_path: Path) -> str:
    """A database URL that cannot be opened: a port nobody listens on, or a SQLite file
    whose directory is a regular file."""
    if backend == "sqlite":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        return f"sqlite:///{blocker / 'quotagate.db'}"
    return f"postgresql://postgres@127.0.0.1:{_free_port()}/test"


@pytest.fixture
async def sink(sink_url: str) -> AsyncIterator[Sink]:
    s = open_sink(sink_url)
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture
def syncer(redis: Any, ledger: Ledger, sink: Sink) -> Syncer:
    return Syncer(redis, ledger.keys, sink, ledger.catalog,
                  SyncOptions(batch_size=200, consumer="test", claim_idle_ms=100))


@pytest.fixture
async def server(redis_server: Any, redis: Any, clock: ManualClock,
                 sink_url: str) -> AsyncIterator[Grpc]:
    """The real server, its SQL store at `sink_url`; the tests drive the sync themselves
    (`app_syncer`) so that what they read is settled."""
    settings = Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, database_url=sink_url,
                        sync_in_process=False, metrics_listen="127.0.0.1:0")
    app = await App(settings, clock=clock).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Grpc(app, channel)
    await channel.close()
    await app.stop()


def app_syncer(app: App) -> Syncer:
    assert app.ledger is not None and app.sink is not None
    return Syncer(app.redis, app.ledger.keys, app.sink, app.ledger.catalog,
                  SyncOptions(consumer="test"))
