"""Settings: one field per QUOTAGATE_* environment variable, each with a default and a doc.
A bad value raises ConfigError naming the variable."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quotagate.errors import ConfigError

PREFIX = "QUOTAGATE_"

#: GRPC_EXPERIMENTS for QUOTAGATE_GRPC_IO=poll: gRPC core's EventEngine switched off for
#: listeners, client channels and every other endpoint, so the core's poll-based I/O runs
#: on the thread that drains the completion queue, not on a separate thread pool
GRPC_POLL_EXPERIMENTS = ("-event_engine_listener,-event_engine_client,"
                         "-event_engine_for_all_other_endpoints")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    listen: str = Field("127.0.0.1:50051", description="gRPC address: all services, health, reflection")
    redis_url: str = Field("", description="redis://, rediss://, unix:// or redis+cluster://h1:p1,h2:p2 (rediss+cluster:// with ?ssl_ca_certs=…); empty: the embedded Redis")
    database_url: str = Field("", description="postgresql://… or sqlite:///path; empty: SQLite in the data dir")
    data_dir: Path = Field(Path(".quotagate"), description="embedded Redis files and the SQLite file")
    catalog: str = Field("", description="TOML catalog of meters, plans, actions; empty: built-in")
    metrics_listen: str = Field("127.0.0.1:9464", description="Prometheus scrape endpoint")
    traces: Literal["", "off", "otlp"] = Field("", description="RPC traces: empty or off (default: no tracer, nothing on the request path); otlp: a SERVER span per call, exported by OTLP gRPC to OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, sampled by OTEL_TRACES_SAMPLER, service.name OTEL_SERVICE_NAME or quotagate")
    shards: int = Field(256, ge=1, le=16384, description="virtual shards; fixed for a deployment")
    default_ttl_seconds: int = Field(300, ge=1, le=86400, description="hold TTL when a request gives none")
    max_ttl_seconds: int = Field(86400, ge=1, le=86400, description="longest TTL a request may ask for")
    retention_seconds: int = Field(86400, ge=60, le=30 * 86400, description="how long a resolved hold (committed, refunded, expired) and a Reserve's idempotency record stay in Redis: repeats of Commit or Refund, a Refund after Commit, and retries of the Reserve answer within it. About 670 bytes of Redis per Reserve+Commit for that long")
    redis_pipeline: bool = Field(True, description="spend-path scripts of concurrent requests share one pipelined connection per worker, written once per loop turn (on a cluster one per primary; TLS too)")
    redis_timeout_ms: int = Field(500, ge=10, le=60000, description="per-command Redis timeout; past it: UNAVAILABLE")
    fail_open: bool = Field(False, description="Redis unreachable (any Redis trouble that answers UNAVAILABLE): runtime calls are answered instead, as Envoy's failure_mode_deny=false would. Reserve GRANTED with what was asked, under an id starting `open.`, no balances; Commit, Refund, Extend of such an id answered as done; Check active; Envoy's ShouldRateLimit OK; GetBalance stays UNAVAILABLE, and so do Commit and Refund of a real hold. Usage granted so is recorded nowhere. Bad input is still INVALID_ARGUMENT")
    ledger_maxlen: int = Field(1_000_000, ge=0, le=1_000_000_000, description="cap (approximate) of each shard's ledger stream of entries SQL has not got yet; past it the oldest are trimmed; 0: never trim")
    sweep_interval_ms: int = Field(1000, ge=10, le=600000, description="how often expired holds are swept")
    grace_seconds: float = Field(5.0, ge=0, le=300, description="drain time on SIGTERM before in-flight RPCs are cut")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256, description="server processes sharing the port (SO_REUSEPORT); default: the cores")
    grpc_io: Literal["poll", "event_engine"] = Field("poll", description="gRPC core's socket I/O: poll (default) does it on the thread that drains the completion queue, fewer thread hand-offs per RPC; event_engine: gRPC's own thread pool (its default). An explicit GRPC_EXPERIMENTS wins over both")
    reuseport: bool = Field(False, description="set by the worker supervisor: bind with SO_REUSEPORT")
    max_connection_age_seconds: float = Field(300.0, ge=0, le=86400, description="a client connection older than this (±10 %) is asked to reconnect (HTTP/2 GOAWAY: calls in flight finish, new calls go on a new connection), so the kernel deals connections over the workers again, after a worker restart too; 0: never")
    max_connection_age_grace_seconds: float = Field(0.0, ge=0, le=86400, description="how long calls still open on such a connection (a WatchStatus stream) may go on before it is closed; 0: until they end")
    low_thresholds: str = Field("80", description="wallet.low fires at these % used (comma separated, e.g. 80,95)")
    # -- events: the notifier (webhooks) ---------------------------------------------------
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated http(s) URLs every event is POSTed to (HMAC-signed)")
    webhook_secret: str = Field("", repr=False, description="HMAC-SHA256 key of X-Quotagate-Signature; required with webhook URLs")
    webhook_timeout_ms: int = Field(5000, ge=10, le=300000, description="per-request timeout of a webhook POST")
    webhook_retry_base_ms: int = Field(500, ge=0, le=3600000, description="first retry delay; doubles each attempt")
    webhook_retry_max_ms: int = Field(60000, ge=0, le=3600000, description="longest delay between two attempts")
    webhook_max_attempts: int = Field(8, ge=1, le=100, description="attempts per event and URL before the dead-letter stream")
    notify_poll_ms: int = Field(200, ge=1, le=60000, description="how often the notifier looks for new events when idle")
    notify_claim_idle_ms: int = Field(60000, ge=1, le=86400000, description="events pending this long at a dead notifier are claimed by another")
    notify_in_process: bool = Field(True, description="run the notifier inside `serve` (false: run `quotagate notify` separately)")
    # -- security ------------------------------------------------------------------------
    api_keys_file: str = Field("", description="TOML or JSON file of API keys (name, sha256, role, org, team); empty: auth off, loopback only")
    tls_cert: str = Field("", description="PEM server certificate (chain); with QUOTAGATE_TLS_KEY turns TLS on")
    tls_key: str = Field("", description="PEM private key of QUOTAGATE_TLS_CERT")
    tls_client_ca: str = Field("", description="PEM CA bundle: when set, clients must present a certificate it signed (mTLS)")
    # -- sync: ledger stream -> SQL ---------------------------------------------------------
    sync_lag_alert_seconds: float = Field(60.0, ge=0, le=86400, description="health service quotagate.v1.Sync turns NOT_SERVING when SQL lags more than this")
    sync_in_process: bool = Field(True, description="run the syncer inside `serve` (false: run `quotagate sync` separately)")
    sync_batch_size: int = Field(1000, ge=1, le=100000, description="ledger entries read per shard per batch")
    sync_poll_ms: int = Field(200, ge=1, le=60000, description="how often the syncer looks for new entries when idle")
    sync_claim_idle_ms: int = Field(30000, ge=1, le=86400000, description="entries pending this long at a dead syncer are claimed by another")
    sync_consumer: str = Field("", description="consumer name in the ledger group; empty: <hostname>-<pid>")

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                                   "rediss+cluster://")):
            raise ValueError("must start with redis://, rediss://, unix://, "
                             "redis+cluster:// or rediss+cluster://")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("must start with postgresql:// or sqlite:///")
        return v

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @field_validator("webhook_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"{u!r} must start with http:// or https://")
        return v

    @field_validator("low_thresholds")
    @classmethod
    def _thresholds(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts or not all(p.isdigit() and 1 <= int(p) <= 100 for p in parts):
            raise ValueError("must be percentages from 1 to 100, comma separated")
        return ",".join(str(int(p)) for p in sorted(parts, key=int))

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v.upper()

    @property
    def loopback(self) -> bool:
        host = self.listen.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:  # an address: 127.0.0.0/8 or ::1; not a host name like "127.example.com"
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def apply_grpc_io(settings: Settings, environ: Any = None) -> str:
    """Choose gRPC core's I/O (QUOTAGATE_GRPC_IO) for this process and the workers it
    starts. gRPC reads GRPC_EXPERIMENTS once, when it loads, so this runs before anything
    imports grpc; an operator's own GRPC_EXPERIMENTS is left as it is. Returns what the
    process runs with."""
    env = os.environ if environ is None else environ
    if "GRPC_EXPERIMENTS" in env:
        return f"GRPC_EXPERIMENTS={env['GRPC_EXPERIMENTS']}"
    if settings.grpc_io == "poll":
        env["GRPC_EXPERIMENTS"] = GRPC_POLL_EXPERIMENTS
    return settings.grpc_io


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with `overrides` (e.g. CLI flags) on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        name = PREFIX + str(err["loc"][0]).upper() if err["loc"] else PREFIX
        raise ConfigError(f"{err['msg']} (got {err.get('input')!r})", name) from None
