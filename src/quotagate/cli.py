"""`quotagate serve` and friends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from quotagate.errors import ConfigError
from quotagate.settings import load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quotagate", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the sidecar (gRPC on QUOTAGATE_LISTEN)")
    serve.add_argument("--listen", help="QUOTAGATE_LISTEN")
    serve.add_argument("--redis-url", help="QUOTAGATE_REDIS_URL")
    serve.add_argument("--data-dir", help="QUOTAGATE_DATA_DIR")
    serve.add_argument("--catalog", help="QUOTAGATE_CATALOG")
    serve.add_argument("--log-level", help="QUOTAGATE_LOG_LEVEL")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(listen=args.listen, redis_url=args.redis_url,
                                 data_dir=args.data_dir, catalog=args.catalog,
                                 log_level=args.log_level)
    except ConfigError as e:
        print(f"quotagate: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.loopback:
        logging.getLogger("quotagate").warning(
            "listening on %s without authentication: API keys arrive in a later release; "
            "keep this port on a private network", settings.listen)
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
