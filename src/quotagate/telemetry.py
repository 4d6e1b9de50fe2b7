"""Every OpenTelemetry instrument of quotagate, defined here once, and the Prometheus
scrape endpoint (`QUOTAGATE_METRICS_LISTEN`).

One MeterProvider per process, exported through a private Prometheus registry.
Instruments:

- `quotagate.sync.lag.entries` (gauge, attribute `shard`): ledger entries not yet in SQL;
- `quotagate.sync.lag.seconds` (gauge, attribute `shard`): age of the oldest of them;
- `quotagate.redis.redirects` (counter, attribute `kind`: moved, ask, tryagain): Redis
  Cluster redirections the spend path followed (a slot migrating or moved, a failover).

The lag gauges are observed from the syncers and LagMonitors registered with `watch_sync`
(their `lag()`), the redirections from the cluster connections registered with
`watch_cluster`.

The RPC statistics are counted on the request path without OpenTelemetry (an instrument
call costs microseconds; these cost a few hundred nanoseconds) into `RpcStats`, a fixed
array of integers, and exported by a collector of the same registry:

- `quotagate_rpc_requests_total` (labels `service`, `method`, `code`): calls answered,
  by gRPC status code (API-key refusals included);
- `quotagate_rpc_duration_seconds` (histogram, labels `service`, `method`): time in
  quotagate from the decoded request to the answer;
- `quotagate_decisions_total` (labels `method`, `decision`, `reason`): what Reserve,
  Check, Extend and Envoy's ShouldRateLimit decided (`granted`/`denied`, the DenyReason);
- `quotagate_fail_open_total` (label `method`): calls answered by `QUOTAGATE_FAIL_OPEN`
  without Redis (not in the decisions: the ledger decided nothing).

With `serve --workers N` every worker counts into a file of its own that it maps into
memory (in a directory the supervisor makes and removes), and worker 0, which alone
serves `/metrics`, adds them all up: one scrape sees the whole server, and a restarted
worker goes on from its file, so the counters never go backwards.
"""

from __future__ import annotations

import bisect
import glob
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from quotagate.ledger.model import DenyReason

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
            reg.register(_RpcCollector())
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


# -- RPC statistics ----------------------------------------------------------------------
def _methods() -> tuple[str, ...]:
    """Every counted method, "/<service>/<method>", in the order of the services'
    descriptors: the same in every worker of a version."""
    from quotagate.envoy import rls_pb2
    from quotagate.v1 import admin_pb2, quota_pb2

    out: list[str] = []
    for module, name in ((quota_pb2, "QuotaService"), (admin_pb2, "AdminService"),
                         (rls_pb2, "RateLimitService")):
        svc = module.DESCRIPTOR.services_by_name[name]
        out += [f"/{svc.full_name}/{m.name}" for m in svc.methods]
    return tuple(out)


METHODS = _methods()
METHOD_INDEX = {m: i for i, m in enumerate(METHODS)}
CODES = tuple(grpc.StatusCode)
CODE_INDEX = {c: i for i, c in enumerate(CODES)}
OK = CODE_INDEX[grpc.StatusCode.OK]
#: upper bounds of the latency histogram's buckets, seconds
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)
REASONS = tuple(DenyReason)
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}
#: the decisions counted per method (the others never decide)
DECIDING = ("Reserve", "Check", "Extend", "ShouldRateLimit")
# one method's slots: counts per code, histogram buckets (+Inf last), the sum of the
# latencies in nanoseconds, decisions: granted × reason, denied × reason, then the
# fail-open answers
_NB = len(BUCKETS) + 1
_SUM = len(CODES) + _NB
_DEC = _SUM + 1
_OPEN = _DEC + 2 * len(REASONS)
STRIDE = _OPEN + 1
SLOTS = STRIDE * len(METHODS)
SIZE = 8 * SLOTS


class RpcStats:
    """The RPC counters of this process: unsigned 64-bit integers in one buffer (its own
    memory, or a file mapped into memory shared with the metrics-serving worker). Each
    slot has one writer, this process, and readers see whole 8-byte values."""

    def __init__(self) -> None:
        self._buf: Any = bytearray(SIZE)
        self.a = memoryview(self._buf).cast("Q")
        self.directory = ""
        self._peers: dict[str, Any] = {}

    def attach(self, directory: str, index: str) -> None:
        """Count into `<directory>/worker-<index>.stats`, keeping what it holds already
        (a restarted worker goes on where it stopped)."""
        path = os.path.join(directory, f"worker-{index}.stats")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != SIZE:
                os.ftruncate(fd, 0)  # another layout, or new: start from zero
                os.ftruncate(fd, SIZE)
            mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        view = memoryview(mm).cast("Q")
        for i, v in enumerate(self.a):  # what this process counted before
            if v:
                view[i] += v
        self._buf, self.a, self.directory = mm, view, directory

    def observe(self, method: int, code: int, seconds: float) -> None:
        a, base = self.a, method * STRIDE
        a[base + code] += 1
        a[base + len(CODES) + bisect.bisect_left(BUCKETS, seconds)] += 1
        a[base + _SUM] += int(seconds * 1e9)

    def decided(self, method: int, granted: bool, reason: DenyReason) -> None:
        self.a[method * STRIDE + _DEC + (0 if granted else len(REASONS))
               + REASON_INDEX[reason]] += 1

    def failed_open(self, method: int) -> None:
        """A call answered without Redis (QUOTAGATE_FAIL_OPEN)."""
        self.a[method * STRIDE + _OPEN] += 1

    def totals(self) -> list[int]:
        """Every slot summed over the workers sharing the directory (or this process)."""
        if not self.directory:
            return list(self.a)
        out = [0] * SLOTS
        for path in sorted(glob.glob(os.path.join(self.directory, "worker-*.stats"))):
            view = self._peers.get(path)
            if view is None:
                try:
                    with open(path, "rb") as f:
                        if os.fstat(f.fileno()).st_size != SIZE:
                            continue
                        mm = mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ)
                except OSError:
                    continue
                view = self._peers[path] = memoryview(mm).cast("Q")
            for i, v in enumerate(view):
                if v:
                    out[i] += v
        return out


#: this process's counters (the servicers count into it)
RPC = RpcStats()


def method_index(full_name: str) -> int:
    """The slot of a method, "/<service>/<method>"; -1: not counted."""
    return METHOD_INDEX.get(full_name, -1)


def refused(full_name: str, code: grpc.StatusCode) -> None:
    """A call answered before its handler ran (API keys)."""
    m = METHOD_INDEX.get(full_name)
    if m is not None:
        RPC.observe(m, CODE_INDEX[code], 0.0)


class _RpcCollector:
    """The RPC statistics as Prometheus metrics, read at each scrape."""

    def collect(self) -> Iterator[Metric]:
        t = RPC.totals()
        requests = CounterMetricFamily("quotagate_rpc_requests", "calls answered, by gRPC "
                                       "status code", labels=["service", "method", "code"])
        duration = HistogramMetricFamily("quotagate_rpc_duration_seconds",
                                         "time from the decoded request to the answer",
                                         labels=["service", "method"], unit="seconds")
        decisions = CounterMetricFamily("quotagate_decisions", "what the calls that decide "
                                        "decided", labels=["method", "decision", "reason"])
        fail_open = CounterMetricFamily("quotagate_fail_open", "calls answered without "
                                        "Redis (QUOTAGATE_FAIL_OPEN)", labels=["method"])
        for i, full in enumerate(METHODS):
            service, _, name = full[1:].rpartition("/")
            base = i * STRIDE
            for c, code in enumerate(CODES):
                if t[base + c]:
                    requests.add_metric([service, name, code.name], t[base + c])
            counts = t[base + len(CODES):base + _SUM]
            if any(counts):
                running, buckets = 0, []
                for le, n in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                    running += n
                    buckets.append((le, running))
                duration.add_metric([service, name], buckets, t[base + _SUM] / 1e9)
            if name in DECIDING:
                for k, r in enumerate(REASONS):
                    for d, label in ((0, "granted"), (1, "denied")):
                        n = t[base + _DEC + d * len(REASONS) + k]
                        if n:
                            decisions.add_metric([name, label, r.name.lower()], n)
            if t[base + _OPEN]:
                fail_open.add_metric([name], t[base + _OPEN])
        yield requests
        yield duration
        yield decisions
        yield fail_open
