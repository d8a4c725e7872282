"""The fleet: `python -m sonic submit` (queue a jobs file), `status` (a batch's progress), `worker` (run jobs on one
ComfyUI server), `db upgrade` (the job database's schema)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..exits import EXIT_OK
from . import DefaultsShown

DATABASE_HELP = ("the job database: sqlite:///path/jobs.db (one machine) or postgresql://user@host/db "
                 "(default $SONIC_DATABASE_URL; a password in $PGPASSWORD or ~/.pgpass stays out of the URL)")


def add_parsers(sub) -> None:
    def common_flags(parser, broker_help="redis://host:6379/0 (rediss:// with TLS) or amqp://user@host// "
                                         "(default $SONIC_BROKER_URL; put passwords there, not on the command line)"):
        parser.add_argument("--database", metavar="URL", default=os.environ.get("SONIC_DATABASE_URL"),
                            help=DATABASE_HELP)
        parser.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                            help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
        parser.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                            help="bucket addressing (Aliyun OSS needs virtual)")
        parser.add_argument("--broker", metavar="URL", help=broker_help)

    submit = sub.add_parser("submit", formatter_class=DefaultsShown,
                            help="queue a jobs file for a fleet of workers; prints the batch's URI",
                            description="Check every job as `batch` does, connect to the broker, upload local "
                                        "inputs to the store once, record the batch and its jobs in the job "
                                        "database (one transaction), then queue one message per job. The same "
                                        "jobs file with the same --batch again queues what a killed submit left "
                                        "(and, with --retry-failed, the failed jobs). Exit status: 0 queued, "
                                        "2 bad invocation or jobs, or a server that does not answer.")
    submit.add_argument("jobs", type=Path, metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl")
    submit.add_argument("--out", required=True, metavar="s3://BUCKET/PREFIX", help="where the batch's folder goes")
    submit.add_argument("--workflow", type=Path, metavar="FILE", help="API-format workflow "
                        "(default: workflows/api/sonic_batch_api.json)")
    submit.add_argument("--retries", type=int, default=2, help="extra attempts after a job's own transient failure "
                        "(out of memory, ...); outages of servers never use them up")
    submit.add_argument("--batch", metavar="NAME", help="the batch's folder name (default: time + random)")
    submit.add_argument("--retry-failed", action="store_true", help="with --batch: queue that batch's failed jobs again")
    submit.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS",
                        help="lifetime of output links (at most 604800, SigV4's limit)")
    submit.add_argument("--server", metavar="URL", help="check the jobs against this ComfyUI's nodes "
                        "(default: the snapshot of this pack's nodes)")
    common_flags(submit)

    status = sub.add_parser("status", formatter_class=DefaultsShown, help="a submitted batch's progress",
                            description="queued / running / done / failed, per worker, each failed job with its "
                                        "reason, from the job database (the broker, when known, adds its queue's "
                                        "length). With --wait, follow it to the end (re-queueing what a crash "
                                        "left), then write the manifest. Exit status: 0 none failed, 1 some failed.")
    status.add_argument("batch", metavar="BATCH", help="the s3:// URI that submit printed (or the batch's name)")
    status.add_argument("--wait", action="store_true", help="follow the batch until every job has finished")
    status.add_argument("--json", action="store_true", help="JSON lines instead of text and a progress bar")
    status.add_argument("--manifest", metavar="FILE", help="also write the manifest here (always: BATCH/manifest.jsonl)")
    common_flags(status, "the broker, to show its queue and re-queue lost jobs (default $SONIC_BROKER_URL)")

    worker = sub.add_parser("worker", formatter_class=DefaultsShown,
                            help="take jobs from the queue and run them on one ComfyUI server",
                            description="One process per ComfyUI server (one per GPU). A job is held under a lease "
                                        "(SONIC_LEASE_SECONDS, default 60, renewed every quarter): a dead worker's "
                                        "job goes to another when it lapses. SIGTERM or Ctrl-C: the running job "
                                        "finishes, then the worker stops.")
    worker.add_argument("--comfyui", required=True, metavar="URL", help="this worker's ComfyUI, e.g. http://127.0.0.1:8188")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at a time (1 per GPU)")
    worker.add_argument("--name", help="the worker's name in status (default: sonic-<port>-<pid>@<host>)")
    worker.add_argument("--job-timeout", type=float, default=0, metavar="SECONDS", help="0 = no limit")
    worker.add_argument("--out-prefix", metavar="s3://BUCKET/PREFIX", help="run only batches stored under this "
                        "prefix (default $SONIC_FLEET_OUT; unset: any the credentials reach)")
    common_flags(worker)

    db = sub.add_parser("db", formatter_class=DefaultsShown, help="the job database: create or upgrade its tables",
                        description="`upgrade` brings the job database to the schema this version needs (new "
                                    "databases are created by the first submit too); `current` prints its version.")
    db.add_argument("action", choices=["upgrade", "current"])
    db.add_argument("--database", metavar="URL", default=os.environ.get("SONIC_DATABASE_URL"), help=DATABASE_HELP)
    submit.set_defaults(run=submit_batch, nothing_done="nothing was queued")
    status.set_defaults(run=batch_status)
    worker.set_defaults(run=run_worker)
    db.set_defaults(run=database)


def submit_batch(args: argparse.Namespace) -> int:
    from ..fleet.batches import submit
    from ..jobdb import database_url

    print(submit(args.jobs, args.broker, args.out, database_url(args.database), args.workflow, args.retries,
                 args.url_expiry, args.batch, args.server, args.s3_endpoint, args.s3_addressing,
                 retry_failed=args.retry_failed))
    return EXIT_OK


def batch_status(args: argparse.Namespace) -> int:
    from ..fleet.batches import status
    from ..jobdb import database_url

    return status(args.batch, args.broker, database_url(args.database), args.wait, args.json, args.manifest,
                  args.s3_endpoint, args.s3_addressing)


def run_worker(args: argparse.Namespace) -> int:
    from ..fleet.queue import broker_url
    from ..fleet.work import serve
    from ..jobdb import database_url

    return serve(broker_url(args.broker), args.comfyui, database_url(args.database), args.concurrency, args.name,
                 args.s3_endpoint, args.s3_addressing, args.job_timeout, args.out_prefix)


def database(args: argparse.Namespace) -> int:
    from ..jobdb import JobDB, database_url
    from ..jobdb.migrate import current, head

    db = JobDB(database_url(args.database))
    try:
        if args.action == "upgrade":
            db.upgrade()
        print(f"{db.display}: schema version {current(db.engine) or 'none'} (this code: {head()})")
    finally:
        db.close()
    return EXIT_OK
