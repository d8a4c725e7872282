"""`python -m sonic serve`: the HTTP service (`sonic.service`), and `serve keys create --tenant NAME`."""

from __future__ import annotations

import argparse
import os

from ..exits import EXIT_OK
from . import DefaultsShown


def add_parsers(sub) -> None:
    serve = sub.add_parser("serve", formatter_class=DefaultsShown,
                           help="the HTTP API and upload page for platforms (FastAPI on uvicorn)",
                           description="Serve the API, the upload page at / and signed webhooks, on the job "
                                       "database. Without --broker it runs on one machine: SQLite and a store "
                                       "folder here, jobs run on the ComfyUI at --comfyui. With --broker (and "
                                       "PostgreSQL, --store s3://...) jobs run on `sonic worker`s. `serve keys "
                                       "create --tenant NAME` makes an API key (shown once) and prints the "
                                       "tenant's webhook secret.")
    serve.add_argument("action", nargs="*", metavar="keys create", help="make an API key instead of serving")
    serve.add_argument("--tenant", help="with `keys create`: the tenant's name (its folders in the store)")
    serve.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="address to serve on")
    serve.add_argument("--database", metavar="URL", default=os.environ.get("SONIC_DATABASE_URL"),
                       help="the job database (default $SONIC_DATABASE_URL, else sqlite:///sonic-jobs.db here)")
    serve.add_argument("--store", metavar="DIR|s3://BUCKET/PREFIX", default=os.environ.get("SONIC_STORE"),
                       help="where inputs (inputs/<tenant>/...) and outputs (<tenant>/jobs/...) live (default "
                            "$SONIC_STORE, else the folder sonic-store here)")
    serve.add_argument("--comfyui", metavar="URL", nargs="+", default=None,
                       help="without --broker: the ComfyUI servers that run the jobs, one job each at a time "
                            "(default http://127.0.0.1:8188)")
    serve.add_argument("--no-executor", dest="executor", action="store_false",
                       help="without --broker: record jobs but run none here (another `serve` on the same database "
                            "and store runs them)")
    serve.add_argument("--broker", metavar="URL", default=os.environ.get("SONIC_BROKER_URL"),
                       help="the fleet's broker: jobs are queued for `sonic worker`s (default $SONIC_BROKER_URL)")
    serve.add_argument("--watch", metavar="s3://BUCKET/PREFIX/",
                       help="start a job for each job description (<name>.json) or photo+recording pair that lands "
                            "under PREFIX/<tenant>/ (also S3 events POSTed to /v1/events/s3)")
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
    if args.watch and not (args.store or "").startswith("s3://"):
        raise ValueError("--watch needs --store s3://bucket/prefix (the jobs read the watched objects from S3)")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {args.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("the service needs FastAPI and uvicorn: pip install 'sonic-portrait[service]'") from None
    from ..service.app import create_app

    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(database, args.store or "sonic-store", args.broker, args.url_expiry, args.s3_endpoint,
                     args.s3_addressing, args.comfyui, args.watch, args.executor)
    uvicorn.run(app, host=host, port=int(port), log_level="info")
    return EXIT_OK
