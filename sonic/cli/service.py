"""`python -m sonic serve`: the HTTP service (`sonic.service`), and `serve keys create --tenant NAME`."""

from __future__ import annotations

import argparse
import os

from ..exits import EXIT_OK
from . import DefaultsShown


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", formatter_class=DefaultsShown,
                           help="the HTTP API for platforms (FastAPI on uvicorn), on the job database",
                           description="Serve the API: jobs from URLs or store keys, per-tenant API keys, "
                                       "Idempotency-Key, /healthz, /metrics, /docs. `serve keys create --tenant "
                                       "NAME` makes an API key (shown once) and prints the tenant's webhook secret. "
                                       "Jobs run on `sonic worker`s fed by --broker.")
    serve.add_argument("action", nargs="*", metavar="keys create", help="make an API key instead of serving")
    serve.add_argument("--tenant", help="with `keys create`: the tenant's name (its folders in the store)")
    serve.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="address to serve on")
    serve.add_argument("--database", metavar="URL", default=os.environ.get("SONIC_DATABASE_URL"),
                       help="the job database (default $SONIC_DATABASE_URL, else sqlite:///sonic-jobs.db here)")
    serve.add_argument("--store", metavar="s3://BUCKET/PREFIX", default=os.environ.get("SONIC_STORE"),
                       help="where inputs (inputs/<tenant>/...) and outputs (<tenant>/jobs/...) live "
                            "(default $SONIC_STORE)")
    serve.add_argument("--broker", metavar="URL", default=os.environ.get("SONIC_BROKER_URL"),
                       help="the fleet's broker: jobs are queued for `sonic worker`s (default $SONIC_BROKER_URL)")
    serve.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS", help="lifetime of output links")
    serve.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                       help="S3-compatible endpoint (default $SONIC_S3_ENDPOINT or AWS)")
    serve.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto")
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    database = args.database or "sqlite:///sonic-jobs.db"
    if args.action:
        if args.action != ["keys", "create"]:
            raise ValueError(f"unknown action {' '.join(args.action)!r}: use `serve keys create --tenant NAME`")
        if not args.tenant:
            raise ValueError("keys create needs --tenant NAME")
        from ..jobdb import JobDB
        from ..jobdb.tenants import Tenants

        db = JobDB(database)
        try:
            db.upgrade()
            key, secret = Tenants(db).create_key(args.tenant)
        finally:
            db.close()
        print(f"api_key: {key}")
        print(f"webhook_secret: {secret}")
        return EXIT_OK
    if not args.store:
        raise ValueError("give --store s3://bucket/prefix (or set SONIC_STORE): where inputs and outputs live")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {args.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("the service needs FastAPI and uvicorn: pip install 'sonic-portrait[service]'") from None
    from ..service.app import create_app

    app = create_app(database, args.store, args.broker, args.url_expiry, args.s3_endpoint, args.s3_addressing)
    uvicorn.run(app, host=host, port=int(port), log_level="info")
    return EXIT_OK
