"""The one composition root: settings -> Redis -> ledger -> servicers -> server.
Signals and shutdown live here too; nothing else constructs long-lived objects."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import urllib.parse
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from quotagate import catalog as catalog_mod
from quotagate import telemetry
from quotagate.clock import Clock, SystemClock
from quotagate.embedded import EmbeddedRedis
from quotagate.envoy import rls_pb2, rls_pb2_grpc
from quotagate.errors import ConfigError, QuotagateError, Unavailable
from quotagate.events.notifier import Notifier, NotifierOptions
from quotagate.ledger.keys import Keys
from quotagate.ledger.model import SeatLimit
from quotagate.ledger.mux import ClusterMux
from quotagate.ledger.store import Ledger, LedgerOptions
from quotagate.server import auth, decoding, envoy_rls, tracing
from quotagate.server.admin import AdminServicer
from quotagate.server.envoy_rls import RateLimitServicer
from quotagate.server.health import Health
from quotagate.server.quota import QuotaServicer
from quotagate.settings import Settings
from quotagate.sync.sink import Sink, default_url, open_sink
from quotagate.sync.syncer import LagMonitor, Syncer, SyncOptions
from quotagate.tasks import raise_if_cancelled
from quotagate.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc
from quotagate.workers import EMBEDDED_VAR, INDEX_VAR, STATS_DIR_VAR

log = logging.getLogger("quotagate")

#: how often a running server checks that Redis still holds the catalog's plans
CATALOG_CHECK_SECONDS = 1.0
#: how often a serve looks whether its embedded Redis still runs
EMBEDDED_POLL_S = 0.25
#: how long App.stop waits for its background tasks to end once cancelled
STOP_TASKS_S = 10.0


class App:
    """A running sidecar. `await App(settings).start()`, then `await app.stop()`."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.embedded: EmbeddedRedis | None = None
        self._reviving: asyncio.Future[bool] | None = None
        self.redis: Any = None
        self.ledger: Ledger | None = None
        self.health: Health | None = None
        self.server: grpc.aio.Server | None = None
        self.notifier: Notifier | None = None
        self.sink: Sink | None = None
        self.syncer: Syncer | None = None
        self.lag_monitor: LagMonitor | None = None
        self.metrics: telemetry.MetricsServer | None = None
        self.tracing: tracing.Tracing | None = None
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    def redis_client(self, url: str) -> Any:
        """A pooled client: `redis+cluster://h1:p1,h2:p2` (or `rediss+cluster://`, with
        TLS options as in a `rediss://` URL's query: `?ssl_ca_certs=/path/ca.pem`) is a
        Redis Cluster seeded from those nodes; anything else a single server."""
        timeout = self.settings.redis_timeout_ms / 1000
        opts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        scheme, _, rest = url.partition("://")
        if scheme in ("redis+cluster", "rediss+cluster"):
            where, _, query = rest.partition("?")
            nodes = [ClusterNode(h, int(p)) for h, _, p in
                     (n.rpartition(":") for n in where.split("/")[0].split(","))]
            return RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"),
                                max_connections=256, **opts, **cluster_tls_options(query))
        return aioredis.Redis.from_url(url, retry_on_timeout=False, max_connections=256, **opts)

    async def start(self) -> App:
        s = self.settings
        keyring = auth.keyring_for(s)  # ConfigError off loopback without API keys
        credentials = auth.server_credentials(s)
        notify = NotifierOptions.from_settings(s) if s.notify_in_process else None
        cat = catalog_mod.load(s.catalog)
        stats_dir = os.environ.get(STATS_DIR_VAR)
        if stats_dir and not telemetry.RPC.directory:  # a worker of `serve --workers N`
            telemetry.RPC.attach(stats_dir, os.environ.get(INDEX_VAR, "0"))
        url = s.redis_url
        if not url:
            self.embedded = EmbeddedRedis(s.data_dir)
            url = await asyncio.to_thread(self.embedded.start)
        self.redis = self.redis_client(url)
        self.ledger = Ledger(self.redis, cat.catalog, self.clock, Keys(s.shards), LedgerOptions(
            default_ttl_s=s.default_ttl_seconds, max_ttl_s=s.max_ttl_seconds,
            low_thresholds=tuple(int(t) for t in s.low_thresholds.split(",")),
            ledger_maxlen=s.ledger_maxlen, pipeline=s.redis_pipeline,
            retain_ms=s.retention_seconds * 1000))
        if isinstance(self.ledger.mux, ClusterMux):
            telemetry.watch_cluster(self.ledger.mux)
        self.health = Health(self.ledger)
        # Sync health from the first answer on, in every worker: the in-process syncer's
        # lag, else what LagMonitor reads from Redis (both start in _start_sync; until
        # their first measurement nothing is known to lag)
        self.health.sync_lag = self._sync_lag
        self.health.sync_alert_seconds = s.sync_lag_alert_seconds
        applied = False
        if await self.health.probe():
            applied = await self._try_catalog(cat)
        else:
            log.error("redis at %s is not answering; serving NOT_SERVING until it does", url)

        self.tracing = tracing.from_settings(s)  # outermost: refusals are traced too
        self.interceptors = [self.tracing.interceptor] if self.tracing else []
        if keyring:
            self.interceptors.append(auth.AuthInterceptor(auth.Authorizer(
                keyring, self.redis, self.ledger.keys)))
        server = grpc.aio.server(options=server_options(s),
                                 interceptors=self.interceptors or None)
        # our services: a request that does not decode is INVALID_ARGUMENT (decoding.py)
        decoding.add(quota_pb2_grpc.add_QuotaServiceServicer_to_server,
                     QuotaServicer(self.ledger, fail_open=s.fail_open), server,
                     quota_pb2.DESCRIPTOR.services_by_name["QuotaService"])
        self.sink = open_sink(default_url(s.database_url, s.data_dir))  # no I/O yet
        decoding.add(admin_pb2_grpc.add_AdminServiceServicer_to_server,
                     AdminServicer(self.ledger, usage=self.sink), server,
                     admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        decoding.add(rls_pb2_grpc.add_RateLimitServiceServicer_to_server,
                     RateLimitServicer(self.ledger, fail_open=s.fail_open), server,
                     rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"])
        reflection.enable_server_reflection((
            envoy_rls.SERVICE,
            quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME), server)
        self.port = (server.add_secure_port(s.listen, credentials) if credentials
                     else server.add_insecure_port(s.listen))
        if not self.port:
            raise QuotagateError(f"cannot listen on {s.listen}", "QUOTAGATE_LISTEN")
        await server.start()
        self.server = server
        await self.health.update()
        self._tasks = [asyncio.create_task(self.health.run(), name="health"),
                       asyncio.create_task(self._sweeper(), name="sweeper"),
                       asyncio.create_task(self._keep_catalog(cat, applied), name="catalog")]
        if keyring is not None and keyring.path is not None:
            self._tasks.append(asyncio.create_task(self._watch_keys(keyring), name="keys"))
        if self.embedded is not None:
            self._tasks.append(asyncio.create_task(self._keep_embedded(), name="embedded"))
        await self._start_sync(cat)
        if notify is not None and notify.urls:
            self.notifier = Notifier(self.redis, self.ledger.keys, notify)
            self._tasks.append(asyncio.create_task(self.notifier.run(), name="notifier"))
        host = s.listen.rpartition(":")[0]
        log.info("quotagate serving on %s:%d (redis %s)", host, self.port,
                 "embedded" if self.embedded else
                 "embedded, shared by the workers" if os.environ.get(EMBEDDED_VAR) else
                 "external")
        return self

    async def _try_catalog(self, cat: catalog_mod.CatalogFile, seed: bool = True) -> bool:
        """Apply the catalog; False when Redis did not answer (a bad seed still raises)."""
        try:
            await self._apply_catalog(cat, seed)
        except (Unavailable, RedisError, OSError) as e:
            log.warning("catalog not applied yet, redis not answering (retrying): %s", e)
            return False
        return True

    async def _keep_catalog(self, cat: catalog_mod.CatalogFile, applied: bool) -> None:
        """Apply the catalog as soon as Redis answers when it did not at start, and again
        when Redis comes back without it (restarted without its data): checked with one
        EXISTS of a catalog plan every CATALOG_CHECK_SECONDS."""
        assert self.ledger is not None
        probe = next((self.ledger.keys.plan(name) for name in cat.catalog.plans), None)
        seed = True
        while not applied or probe is not None:
            await asyncio.sleep(CATALOG_CHECK_SECONDS)
            raise_if_cancelled()
            if applied:
                try:
                    if await self.redis.exists(probe):
                        continue
                except (RedisError, OSError):
                    continue  # down: health reports it; checked again when it answers
                # Plans only: the orgs (the seed's too) come back with `quotagate restore`,
                # which a fresh seed would get in the way of.
                log.warning("catalog plans missing in redis (restarted without its data?): "
                            "applying the catalog's plans again; run `quotagate restore` "
                            "to bring the orgs back from SQL")
                seed = False
            try:
                applied = await self._try_catalog(cat, seed)
            except QuotagateError as e:
                log.error("catalog not applied: %s", e)
                return
            if applied:
                log.info("catalog applied")

    async def _apply_catalog(self, cat: catalog_mod.CatalogFile, seed_too: bool = True) -> None:
        """Catalog plans are (re)applied at every start (and when Redis lost them, see
        _keep_catalog). The seed creates the orgs that do not exist yet, with their teams,
        seats, assistants and top-ups; an org that exists is left as it is (what an admin
        changed since stays)."""
        assert self.ledger is not None
        ledger = self.ledger
        for name, allowances in cat.catalog.plans.items():
            await ledger.upsert_plan(name, allowances)
        if not seed_too:
            return
        seed = cat.seed
        new: set[str] = set()
        marks = ledger.keys.seeding()
        for o in seed.orgs:
            org = o["org_id"]
            if await self.redis.sismember(marks, org) or \
                    not await self.redis.exists(ledger.keys.cfg(org)):
                await self.redis.sadd(marks, org)  # until all of it is there
                new.add(org)
                await ledger.upsert_org(org, o["plan"], o.get("seats", 0),
                                        o.get("period_anchor_day", 0),
                                        o.get("ai_enabled", True))
        for t in seed.teams:
            if t["org_id"] in new:
                await ledger.upsert_team(t["org_id"], t["team_id"], t.get("seats", 0))
        for st in seed.seats:
            if st["org_id"] not in new:
                continue
            await ledger.upsert_seat(st["org_id"], st["seat_id"], st.get("team_id", ""), [
                SeatLimit(lim["meter"], lim.get("monthly_limit", 0), lim.get("unlimited", False))
                for lim in st.get("limits", ())])
        for a in seed.assistants:
            if a["org_id"] not in new:
                continue
            await ledger.upsert_assistant(a["org_id"], a["assistant_id"], a.get("team_id", ""),
                                          a.get("enabled", True))
        for tp in seed.topups:
            if tp["org_id"] not in new:
                continue
            await ledger.topup(tp["org_id"], tp["meter"], tp["amount"], tp["purchase_id"],
                               tp.get("team_id", ""), tp.get("seat_id", ""))
        if new:
            await self.redis.srem(marks, *sorted(new))

    async def _start_sync(self, cat: catalog_mod.CatalogFile) -> None:
        """Migrate the SQL store, start the in-process syncer and the metrics endpoint.
        An unreachable database is logged, not fatal: the syncer retries, entries wait."""
        assert self.ledger is not None and self.sink is not None
        s = self.settings
        try:
            await self.sink.migrate()
        except Exception as e:
            log.error("database %s not ready (the syncer will retry): %s",
                      s.database_url or "sqlite", e)
        if s.sync_in_process:
            self.syncer = Syncer(self.redis, self.ledger.keys, self.sink, cat.catalog,
                                 SyncOptions.from_settings(s))
            telemetry.watch_sync(self.syncer)
            self._tasks.append(asyncio.create_task(self.syncer.run(), name="syncer"))
        else:
            # the syncer runs elsewhere (another worker, `quotagate sync`): the lag is
            # read from Redis here too, so every worker answers the Sync health service
            # and /metrics has the lag gauges whichever process runs the syncer
            self.lag_monitor = LagMonitor(self.redis, self.ledger.keys)
            telemetry.watch_sync(self.lag_monitor)
            self._tasks.append(asyncio.create_task(self.lag_monitor.run(), name="sync-lag"))
        # one /metrics per server: with --workers, worker 0's, adding up every worker
        if os.environ.get(INDEX_VAR, "0") == "0":
            self.metrics = telemetry.start_metrics_server(s.metrics_listen)

    def _sync_lag(self) -> dict[int, tuple[int, float]]:
        source = self.syncer or self.lag_monitor
        return source.lag() if source is not None else {}

    @staticmethod
    async def _watch_keys(keyring: auth.KeyRing) -> None:
        while True:
            await asyncio.sleep(auth.KEYS_POLL_SECONDS)
            keyring.reload_if_changed()

    async def _keep_embedded(self) -> None:
        """The embedded Redis started again should it die (EmbeddedRedis.revive), in a
        thread: loading its AOF takes a while, and health keeps answering meanwhile."""
        assert self.embedded is not None
        while True:
            await asyncio.sleep(EMBEDDED_POLL_S)
            raise_if_cancelled()
            if not self.embedded.alive() and not self._stopped.is_set():
                self._reviving = asyncio.ensure_future(asyncio.to_thread(self.embedded.revive))
                await asyncio.shield(self._reviving)

    async def _sweeper(self) -> None:
        assert self.ledger is not None
        # One sweep per interval for the whole fleet (Ledger.sweep_due), not one per process.
        interval_ms = self.settings.sweep_interval_ms
        owner = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            await asyncio.sleep(interval_ms / 1000)
            raise_if_cancelled()
            try:
                await self.ledger.sweep_due(interval_ms, owner)
            except QuotagateError as e:
                log.debug("sweep skipped: %s", e)

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.health:
            await self.health.drain()
        if self.server:
            await self.server.stop(self.settings.grace_seconds)
        delivering = [t for t in self._tasks if t.get_name() == "notifier"]
        if self.notifier is not None and delivering:  # the event in hand, briefly
            self.notifier.stop()
            await asyncio.wait(delivering, timeout=2)
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # each ends at its next turn at the latest; one that does not (stuck in a
            # call that ignores cancellation) is reported, and the stop goes on
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TASKS_S)
            for t in stuck:
                log.error("task %s did not end within %.0f s of the stop: %s",
                          t.get_name(), STOP_TASKS_S, "".join(_stack_of(t)))
        for t in self._tasks:
            if t.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if self.sink is not None:
            await self.sink.close()
        if self.metrics is not None:
            self.metrics.stop()
        for source in (self.syncer, self.lag_monitor):  # a stopped App reports no lag
            if source is not None:
                telemetry.unwatch_sync(source)
        if self.tracing is not None:
            await self.tracing.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.embedded:
            if self._reviving is not None:  # a restart under way ends before the stop
                with contextlib.suppress(Exception):
                    await self._reviving
            await self.embedded.stop()
        log.info("quotagate stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


def _stack_of(task: asyncio.Task[Any]) -> list[str]:
    import io

    out = io.StringIO()
    task.print_stack(file=out)
    return [out.getvalue()]


def settle_heap() -> int:
    """Once the server is up: collect, then move every object alive now (modules, the
    catalog, descriptors, script objects, the server itself: they live as long as the
    process) out of the garbage collector's reach. Under load the requests in flight are
    promoted into the oldest generation and set off a full collection every few seconds,
    which walked all of these too, with the event loop standing still: on the benchmark
    machine, in 17 s of Reserve+Commit, 7-11 full collections per worker, 190-235 ms in
    all (up to 48 ms at once); frozen, 30-40 ms in all, most of it the collection here.
    Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


#: TLS options a `rediss+cluster://` URL's query may give, as redis-py names them
CLUSTER_TLS_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                       "ssl_cert_reqs", "ssl_check_hostname")


def cluster_tls_options(query: str) -> dict[str, Any]:
    """`ssl_ca_certs=/ca.pem&ssl_check_hostname=false` as redis-py cluster keywords; any
    other name is a ConfigError naming QUOTAGATE_REDIS_URL."""
    out: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in CLUSTER_TLS_OPTIONS:
            raise ConfigError(f"unknown option {name!r} in a cluster URL (known: "
                              f"{', '.join(CLUSTER_TLS_OPTIONS)})", "QUOTAGATE_REDIS_URL")
        out[name] = value.lower() not in ("0", "false", "no") \
            if name == "ssl_check_hostname" else value
    return out


def server_options(s: Settings) -> list[tuple[str, int]]:
    """gRPC core's server arguments. The workers share the port and the kernel gives each
    new connection to one of them at random, for good: an ageing limit makes clients
    reconnect now and then, so a bad draw, or the pile-up on the survivors while a
    worker restarts, does not last."""
    opts = [("grpc.so_reuseport", 1 if s.reuseport else 0)]
    if s.max_connection_age_seconds > 0:
        opts.append(("grpc.max_connection_age_ms", round(s.max_connection_age_seconds * 1000)))
        if s.max_connection_age_grace_seconds > 0:
            opts.append(("grpc.max_connection_age_grace_ms",
                         round(s.max_connection_age_grace_seconds * 1000)))
    return opts


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    app = App(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    log.debug("%d objects of the started server frozen out of the garbage collector",
              settle_heap())
    try:
        await stop.wait()
        log.info("signal received: draining (NOT_SERVING) for up to %.1fs",
                 settings.grace_seconds)
    finally:
        await app.stop()
