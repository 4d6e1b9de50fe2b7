"""Every OpenTelemetry instrument of quotagate, defined here once, and the Prometheus
scrape endpoint (`QUOTAGATE_METRICS_LISTEN`).

One MeterProvider per process, exported through a private Prometheus registry.
Instruments:

- `quotagate.sync.lag.entries` (gauge, attribute `shard`): ledger entries not yet in SQL;
- `quotagate.sync.lag.seconds` (gauge, attribute `shard`): age of the oldest of them;
- `quotagate.redis.redirects` (counter, attribute `kind`: moved, ask, tryagain): Redis
  Cluster redirections the spend path followed (a slot migrating or moved, a failover).

The lag gauges are observed from the syncers registered with `watch_sync` (their
`lag()`), the redirections from the cluster connections registered with `watch_cluster`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("quotagate.telemetry")


class LagSource(Protocol):
    def lag(self) -> dict[int, tuple[int, float]]: ...


class RedirectSource(Protocol):
    redirects: dict[str, int]


_lock = threading.Lock()
_sources: weakref.WeakSet[Any] = weakref.WeakSet()
_clusters: weakref.WeakSet[Any] = weakref.WeakSet()
_state: dict[str, Any] = {}


def _observe(index: int) -> Any:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for src in list(_sources):
            for shard, values in src.lag().items():
                yield Observation(values[index], {"shard": shard})
    return callback


def _redirects(options: CallbackOptions) -> Iterable[Observation]:
    totals: dict[str, int] = {}
    for src in list(_clusters):
        for kind, n in src.redirects.items():
            totals[kind] = totals.get(kind, 0) + n
    for kind, n in totals.items():
        yield Observation(n, {"kind": kind})


def _setup() -> CollectorRegistry:
    with _lock:
        if "registry" not in _state:
            reg = CollectorRegistry(auto_describe=True)
            reader = PrometheusMetricReader(registry=reg)
            provider = MeterProvider(metric_readers=[reader])
            meter = provider.get_meter("quotagate")
            meter.create_observable_gauge(
                "quotagate.sync.lag.entries", callbacks=[_observe(0)], unit="{entry}",
                description="ledger entries not yet copied to SQL, per shard")
            meter.create_observable_gauge(
                "quotagate.sync.lag.seconds", callbacks=[_observe(1)], unit="s",
                description="age of the oldest ledger entry not yet copied to SQL, per shard")
            meter.create_observable_counter(
                "quotagate.redis.redirects", callbacks=[_redirects], unit="{redirect}",
                description="Redis Cluster redirections (MOVED, ASK, TRYAGAIN) the spend "
                            "path followed")
            _state.update(registry=reg, provider=provider)
        out: CollectorRegistry = _state["registry"]
        return out


def registry() -> CollectorRegistry:
    """The Prometheus registry the instruments export to (tests read it directly)."""
    return _setup()


def watch_sync(source: LagSource) -> None:
    """Report `source.lag()` through the lag gauges (until it is garbage collected)."""
    _setup()
    _sources.add(source)


def unwatch_sync(source: LagSource) -> None:
    _sources.discard(source)


def watch_cluster(source: RedirectSource) -> None:
    """Report `source.redirects` through the redirections counter (until it is garbage
    collected)."""
    _setup()
    _clusters.add(source)


@dataclass
class MetricsServer:
    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self, wait: bool = False) -> None:
        """Stop serving. The HTTP loop notices within its 0.5 s poll; by default that
        happens in the background so shutting quotagate down does not wait for it."""

        def run() -> None:
            self.server.shutdown()
            self.server.server_close()

        if wait:
            run()
            self.thread.join(timeout=5)
        else:
            threading.Thread(target=run, name="metrics-stop", daemon=True).start()


def start_metrics_server(listen: str) -> MetricsServer | None:
    """Serve /metrics on `host:port` (port 0: any free port). A port in use is logged,
    not fatal: metrics are optional, quotas are not."""
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), addr=host.strip("[]"),
                                           registry=_setup())
    except OSError as e:
        log.warning("metrics endpoint on %s not started: %s", listen, e)
        return None
    return MetricsServer(server, thread)
