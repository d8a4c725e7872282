"""`python -m sonic batch`: a jobs file through ComfyUI servers' queue API (no GPU, torch or ComfyUI needed here)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import DefaultsShown


def add_parsers(sub) -> None:
    batch = sub.add_parser(
        "batch", help="run a jobs file through ComfyUI servers' queue API (no GPU needed here)",
        description="Run every job of a .csv/.jsonl file through one or more ComfyUI servers with this pack, "
                    "fetch each MP4 to a folder or s3://, record each finished job in a manifest. Running the "
                    "same command again resumes: finished jobs are skipped. Exit status: 0 all done, 1 some "
                    "failed, 2 bad invocation or jobs file, 130 cancelled.",
        formatter_class=DefaultsShown)
    batch.add_argument("jobs", type=Path, metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl")
    batch.add_argument("--server", dest="servers", action="append", required=True, metavar="URL",
                       help="ComfyUI server base URL, e.g. http://gpu1:8188 (repeat for several)")
    batch.add_argument("--out", required=True, metavar="DEST", help="output folder, or s3://bucket/prefix")
    batch.add_argument("--workflow", type=Path, metavar="FILE",
                       help="API-format workflow made of the Sonic nodes (default: workflows/api/sonic_batch_api.json)")
    batch.add_argument("--retries", type=int, default=2, help="extra attempts for a transient failure "
                       "(server gone, out of memory); a job's own bad input is never retried")
    batch.add_argument("--manifest", metavar="FILE", help="manifest location (default: DEST/manifest.jsonl)")
    batch.add_argument("--retry-failed", action="store_true", help="also rerun jobs that failed in an earlier run")
    batch.add_argument("--json", action="store_true", help="one JSON event per line on stdout instead of a progress bar")
    batch.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS",
                       help="lifetime of the presigned links to s3:// outputs in the manifest")
    batch.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                       help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
    batch.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                       help="bucket addressing (Aliyun OSS needs virtual)")
    batch.add_argument("--job-timeout", type=float, default=0, metavar="SECONDS",
                       help="interrupt and retry a job that runs longer (0 = no limit)")
    batch.add_argument("--backoff", type=float, default=5.0, metavar="SECONDS",
                       help="wait before the first retry; doubles with each further one")
    batch.add_argument("--give-up-after", type=float, default=60.0, metavar="SECONDS",
                       help="stop when no server has answered for this long (the manifest stays resumable)")
    batch.add_argument("--check", action="store_true",
                       help="check the jobs, the servers (nodes, model files) and that the destination is writable; "
                            "print what was checked and run nothing")
    batch.set_defaults(run=run, nothing_done="nothing was submitted")


def run(args: argparse.Namespace) -> int:
    from ..batch.runner import Settings
    from ..batch.runner import run as run_batch

    return run_batch(Settings(jobs=args.jobs, servers=args.servers, out=args.out, workflow=args.workflow,
                        retries=args.retries, manifest=args.manifest, json=args.json, retry_failed=args.retry_failed,
                        url_expiry_s=args.url_expiry, s3_endpoint=args.s3_endpoint, s3_addressing=args.s3_addressing,
                        backoff_s=args.backoff, job_timeout_s=args.job_timeout, give_up_s=args.give_up_after,
                        check=args.check))
