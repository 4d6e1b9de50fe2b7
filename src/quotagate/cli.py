"""`quotagate serve` and friends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from quotagate.errors import ConfigError
from quotagate.settings import apply_grpc_io, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quotagate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (gRPC on QUOTAGATE_LISTEN)")
    serve.add_argument("--listen", help="QUOTAGATE_LISTEN")
    serve.add_argument("--redis-url", help="QUOTAGATE_REDIS_URL")
    serve.add_argument("--data-dir", help="QUOTAGATE_DATA_DIR")
    serve.add_argument("--catalog", help="QUOTAGATE_CATALOG")
    serve.add_argument("--log-level", help="QUOTAGATE_LOG_LEVEL")
    serve.add_argument("--workers", type=int, help="QUOTAGATE_WORKERS: server processes "
                       "sharing the port (default: the number of cores)")
    notify = sub.add_parser("notify",
                            help="deliver events to the webhooks (QUOTAGATE_WEBHOOK_URLS)")
    notify.add_argument("--redis-url", help="QUOTAGATE_REDIS_URL")
    notify.add_argument("--log-level", help="QUOTAGATE_LOG_LEVEL")
    notify.add_argument("--once", action="store_true", help="one pass over the streams, then exit")
    notify.add_argument("--replay-deadletter", action="store_true",
                        help="send the dead-lettered events again to their URLs, then exit")
    health = sub.add_parser("health", help="ask a running server's gRPC health service "
                            "(exit 0: SERVING); for Docker HEALTHCHECK and Kubernetes probes")
    health.add_argument("--listen", help="the server's address (default: QUOTAGATE_LISTEN; "
                        "0.0.0.0 and [::] are asked on loopback)")
    health.add_argument("--service", default="",
                        help="a component: quotagate.v1.QuotaService (Redis), "
                             "quotagate.v1.Sync (the copy to SQL); default: the server")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    for name, text in (("migrate", "apply the SQL migrations (QUOTAGATE_DATABASE_URL)"),
                       ("sync", "copy the ledger streams to SQL (the syncer on its own)"),
                       ("restore", "write the SQL snapshots back into Redis after a loss")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--redis-url", help="QUOTAGATE_REDIS_URL")
        cmd.add_argument("--database-url", help="QUOTAGATE_DATABASE_URL")
        cmd.add_argument("--data-dir", help="QUOTAGATE_DATA_DIR")
        cmd.add_argument("--log-level", help="QUOTAGATE_LOG_LEVEL")
        if name == "sync":
            cmd.add_argument("--once", action="store_true",
                             help="copy what is there now, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("migrate", "sync", "restore"):
        return _sync_command(args)
    if args.command == "notify":
        return _notify(args)
    if args.command == "health":
        return _health(args)
    try:
        settings = load_settings(listen=args.listen, redis_url=args.redis_url,
                                 data_dir=args.data_dir, catalog=args.catalog,
                                 log_level=args.log_level, workers=args.workers)
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "grpc" in sys.modules:  # pragma: no cover - only when embedded in another program
        logging.getLogger("quotagate").warning(
            "grpc was loaded before quotagate serve: QUOTAGATE_GRPC_IO has no effect")
    apply_grpc_io(settings)  # before grpc loads, here and in the workers (they inherit it)
    if settings.workers > 1:
        from quotagate.workers import run_workers

        try:
            return run_workers(settings, settings.workers)
        except ConfigError as e:
            print(f"quotagate: configuration error: {e}", file=sys.stderr)
            return 2
    from quotagate.app import serve

    try:
        import uvloop

        uvloop.run(serve(settings))
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(serve(settings))
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


def _health(args: argparse.Namespace) -> int:
    """Plaintext ports only (a TLS port: a gRPC health client with its certificates)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quotagate.settings import Settings

    listen = args.listen or Settings.model_fields["listen"].default
    if not args.listen:
        import os

        listen = os.environ.get("QUOTAGATE_LISTEN", listen)
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    try:
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"quotagate health: {host}:{port}: {e.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(status)
    return 0 if r.status == health_pb2.HealthCheckResponse.SERVING else 1


def _notify(args: argparse.Namespace) -> int:
    """`quotagate notify`: the notifier on its own (see quotagate.events.notifier.main)."""
    from quotagate.events import notifier

    try:
        settings = load_settings(redis_url=args.redis_url, log_level=args.log_level)
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return asyncio.run(notifier.main(settings, once=args.once,
                                         replay=args.replay_deadletter))
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2


def _sync_command(args: argparse.Namespace) -> int:
    """`quotagate migrate | sync | restore` (see quotagate.sync)."""
    from quotagate.sync import restore, syncer
    from quotagate.sync.sink import default_url, open_sink

    try:
        settings = load_settings(redis_url=args.redis_url, database_url=args.database_url,
                                 data_dir=args.data_dir, log_level=args.log_level)
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def migrate() -> int:
        sink = open_sink(default_url(settings.database_url, settings.data_dir))
        try:
            applied = await sink.migrate()
        finally:
            await sink.close()
        print(f"applied {', '.join(applied)}" if applied else "schema up to date")
        return 0

    try:
        if args.command == "migrate":
            return asyncio.run(migrate())
        if args.command == "restore":
            return asyncio.run(restore.main(settings))
        return asyncio.run(syncer.main(settings, once=args.once))
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

