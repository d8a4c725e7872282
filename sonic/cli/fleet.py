"""The fleet: `python -m sonic submit` (queue a jobs file), `status` (a batch's progress), `worker` (run jobs on one
ComfyUI server)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..exits import EXIT_OK
from . import DefaultsShown


def add_parsers(sub) -> None:
    def store_flags(parser):
        parser.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                            help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
        parser.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                            help="bucket addressing (Aliyun OSS needs virtual)")
        parser.add_argument("--broker", metavar="URL", help="redis://host:6379/0 or amqp://user@host// "
                            "(default $SONIC_BROKER_URL)")

    submit = sub.add_parser("submit", formatter_class=DefaultsShown,
                            help="queue a jobs file for a fleet of workers; prints the batch's URI",
                            description="Check every job as `batch` does, upload local inputs to the store once, "
                                        "queue one task per job. Exit status: 0 queued, 2 bad invocation or jobs.")
    submit.add_argument("jobs", type=Path, metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl")
    submit.add_argument("--out", required=True, metavar="s3://BUCKET/PREFIX", help="where the batch's folder goes")
    submit.add_argument("--workflow", type=Path, metavar="FILE", help="API-format workflow "
                        "(default: workflows/api/sonic_batch_api.json)")
    submit.add_argument("--retries", type=int, default=2, help="extra attempts for a transient failure")
    submit.add_argument("--batch", metavar="NAME", help="the batch's folder name (default: time + random)")
    submit.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS", help="lifetime of output links")
    submit.add_argument("--server", metavar="URL", help="check the jobs against this ComfyUI's nodes "
                        "(default: the snapshot of this pack's nodes)")
    store_flags(submit)

    status = sub.add_parser("status", formatter_class=DefaultsShown, help="a submitted batch's progress",
                            description="queued / running / done / failed, per worker, from the batch's records in "
                                        "the store (the broker, when known, adds the queue's length). With --wait, "
                                        "follow it to the end, then write the manifest. Exit status: 0 all done, "
                                        "1 some failed.")
    status.add_argument("batch", metavar="BATCH", help="the s3:// URI that submit printed")
    status.add_argument("--wait", action="store_true", help="follow the batch until every job has finished")
    status.add_argument("--json", action="store_true", help="JSON lines instead of text and a progress bar")
    status.add_argument("--manifest", metavar="FILE", help="also write the manifest here (always: BATCH/manifest.jsonl)")
    store_flags(status)

    worker = sub.add_parser("worker", formatter_class=DefaultsShown,
                            help="take jobs from the queue and run them on one ComfyUI server",
                            description="One process per ComfyUI server (one per GPU). SIGTERM or Ctrl-C: the running "
                                        "job finishes, then the worker stops. Redelivery after a crash: "
                                        "SONIC_VISIBILITY_TIMEOUT (s, Redis).")
    worker.add_argument("--comfyui", required=True, metavar="URL", help="this worker's ComfyUI, e.g. http://127.0.0.1:8188")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at a time (1 per GPU)")
    worker.add_argument("--name", help="the worker's name in status (default: sonic-<port>-<pid>@<host>)")
    worker.add_argument("--job-timeout", type=float, default=0, metavar="SECONDS", help="0 = no limit")
    store_flags(worker)
    submit.set_defaults(run=submit_batch, nothing_done="nothing was queued")
    status.set_defaults(run=batch_status)
    worker.set_defaults(run=run_worker)


def submit_batch(args: argparse.Namespace) -> int:
    from ..fleet.batches import submit

    print(submit(args.jobs, args.broker, args.out, args.workflow, args.retries, args.url_expiry, args.batch,
                 args.server, args.s3_endpoint, args.s3_addressing))
    return EXIT_OK


def batch_status(args: argparse.Namespace) -> int:
    from ..fleet.batches import status

    return status(args.batch, args.broker, args.wait, args.json, args.manifest, args.s3_endpoint, args.s3_addressing)


def run_worker(args: argparse.Namespace) -> int:
    from ..fleet.queue import broker_url
    from ..fleet.work import serve

    return serve(broker_url(args.broker), args.comfyui, args.concurrency, args.name, args.s3_endpoint,
                 args.s3_addressing, args.job_timeout)
