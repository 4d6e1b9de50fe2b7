"""`quotagate serve` and friends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from quotagate.errors import ConfigError
from quotagate.settings import PREFIX, apply_grpc_io, load_settings

#: `serve` flags that stand for a QUOTAGATE_* variable (argparse dest = Settings field)
SERVE_FLAGS = ("listen", "redis_url", "database_url", "data_dir", "catalog",
               "metrics_listen", "log_level", "fail_open")


def export_flags(flags: dict[str, str | None], environ: Any = None) -> None:
    """The flags given, as their variables, so the workers of `serve --workers N` (which
    read the environment) run with them too: a flag overrides the variable."""
    import os

    env = os.environ if environ is None else environ
    for name, value in flags.items():
        if value is not None:
            env[PREFIX + name.upper()] = value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quotagate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (gRPC on QUOTAGATE_LISTEN)")
    serve.add_argument("--listen", help="QUOTAGATE_LISTEN")
    serve.add_argument("--redis-url", help="QUOTAGATE_REDIS_URL")
    serve.add_argument("--database-url", help="QUOTAGATE_DATABASE_URL")
    serve.add_argument("--data-dir", help="QUOTAGATE_DATA_DIR")
    serve.add_argument("--catalog", help="QUOTAGATE_CATALOG")
    serve.add_argument("--metrics-listen", help="QUOTAGATE_METRICS_LISTEN")
    serve.add_argument("--log-level", help="QUOTAGATE_LOG_LEVEL")
    serve.add_argument("--fail-open", action="store_const", const="true",
                       help="QUOTAGATE_FAIL_OPEN=true: grant runtime calls while Redis is "
                       "unreachable (recorded nowhere; see the README)")
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
    admin = sub.add_parser("admin", help="call any AdminService or QuotaService method with "
                           "a JSON request and print the JSON answer",
                           description="e.g. quotagate admin TopUp '{\"org_id\": \"demo\", "
                           "\"meter\": \"message_tokens\", \"amount\": 5000, "
                           "\"purchase_id\": \"inv-1\"}'; `quotagate admin list` lists the "
                           "methods. Streaming methods print one JSON line per message.")
    admin.add_argument("method", help="a method name (UpsertOrg, TopUp, GetBalance, …), or list")
    admin.add_argument("request", nargs="?", default="{}",
                       help="the request as JSON (proto field names; default {}; - reads stdin)")
    admin.add_argument("--listen", help="the server's address (default: QUOTAGATE_LISTEN)")
    admin.add_argument("--api-key", help="sent as a bearer token (default: QUOTAGATE_API_KEY)")
    admin.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    bench = sub.add_parser("bench", help="Reserve+Commit against the health check on this "
                           "machine: a server of its own on a temp embedded Redis")
    from quotagate.benchmark import add_arguments

    add_arguments(bench)
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
    if args.command == "admin":
        return _admin(args)
    if args.command == "bench":
        from quotagate import benchmark

        return benchmark.run(args)
    flags = {name: getattr(args, name) for name in SERVE_FLAGS}
    try:
        settings = load_settings(**flags, workers=args.workers)
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    export_flags(flags)
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


def _address(listen: str | None) -> str:
    """--listen, else QUOTAGATE_LISTEN, else the default; a wildcard host is asked on
    loopback."""
    import os

    from quotagate.settings import Settings

    listen = listen or os.environ.get("QUOTAGATE_LISTEN") or \
        str(Settings.model_fields["listen"].default)
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _admin(args: argparse.Namespace) -> int:
    """One call, JSON in, JSON out: exit 0 answered, 1 a gRPC error, 2 a bad command."""
    import json
    import os

    import grpc
    from google.protobuf import json_format

    from quotagate.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc

    services = ((admin_pb2, "AdminService", admin_pb2_grpc.AdminServiceStub),
                (quota_pb2, "QuotaService", quota_pb2_grpc.QuotaServiceStub))
    methods = {m.name: (m, stub) for module, svc, stub in services
               for m in module.DESCRIPTOR.services_by_name[svc].methods}
    if args.method == "list":
        for name, (m, _) in sorted(methods.items()):
            print(f"{name:<24} {m.containing_service.name}  ({m.input_type.name})")
        return 0
    if args.method not in methods:
        print(f"quotagate admin: no method {args.method!r} (quotagate admin list)",
              file=sys.stderr)
        return 2
    m, stub_class = methods[args.method]
    from google.protobuf import message_factory

    request = message_factory.GetMessageClass(m.input_type)()
    text = sys.stdin.read() if args.request == "-" else args.request
    try:
        json_format.Parse(text, request)
    except (json_format.ParseError, json.JSONDecodeError) as e:
        print(f"quotagate admin: the request is not a {m.input_type.name}: {e}",
              file=sys.stderr)
        return 2
    key = args.api_key or os.environ.get("QUOTAGATE_API_KEY", "")
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(_address(args.listen)) as ch:
        call = getattr(stub_class(ch), m.name)
        try:
            if m.server_streaming:
                for msg in call(request, metadata=metadata):
                    print(json_format.MessageToJson(msg, indent=None), flush=True)
            else:
                reply = call(request, timeout=args.timeout, metadata=metadata)
                print(json_format.MessageToJson(reply, indent=2))
        except grpc.RpcError as e:
            print(f"quotagate admin: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
    return 0


def _health(args: argparse.Namespace) -> int:
    """Plaintext ports only (a TLS port: a gRPC health client with its certificates)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = _address(args.listen)
    try:
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"quotagate health: {address}: {e.code().name}", file=sys.stderr)
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

