"""`python -m sonic storage setup INPUTS OUTPUTS`: bucket hygiene for the service's store (`sonic.service.buckets`)."""

from __future__ import annotations

import argparse
import json
import os

from ..exits import EXIT_FAILED, EXIT_OK
from . import DefaultsShown


def add_parsers(sub) -> None:
    storage = sub.add_parser("storage", help="the store's buckets: `storage setup` applies versioning, a lifecycle "
                                             "and a public access block")
    actions = storage.add_subparsers(dest="storage_command", required=True)
    setup = actions.add_parser(
        "setup", formatter_class=DefaultsShown, help="apply versioning, lifecycle and public access block",
        description="On both buckets: versioning, a public access block (all four flags) and a lifecycle that "
                    "removes unfinished multipart uploads after 1 day; on the inputs bucket the lifecycle also moves "
                    "inputs to STANDARD_IA after 7 days and GLACIER after 30. Lifecycle rules of other IDs already on "
                    "a bucket are kept. Each setting is tried on its own and read back; the report says, per "
                    "setting, `applied` or `NOT applied` with the store's reason. Exit status: 0 all applied, "
                    "1 some not applied (apply those in the store's console or with its own tool), 2 bad invocation, "
                    "a missing bucket or credentials the store refuses (nothing was applied).")
    setup.add_argument("inputs", metavar="s3://INPUTS-BUCKET[/prefix]", help="where the service keeps inputs")
    setup.add_argument("outputs", metavar="s3://OUTPUTS-BUCKET[/prefix]", help="where rendered MP4s go (may be the "
                       "same bucket, another folder)")
    setup.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                       help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
    setup.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                       help="bucket addressing (Aliyun OSS needs virtual)")
    setup.add_argument("--infrequent-after", type=int, default=7, metavar="DAYS",
                       help="inputs move to infrequent access (STANDARD_IA) after DAYS (AWS S3 wants 30 or more)")
    setup.add_argument("--archive-after", type=int, default=30, metavar="DAYS",
                       help="inputs move to archive storage (GLACIER) after DAYS")
    setup.add_argument("--dry-run", action="store_true", help="print the documents (JSON, per bucket) that would "
                       "be applied, without contacting the store")
    setup.set_defaults(run=storage_setup)


def storage_setup(args: argparse.Namespace) -> int:
    from ..service import buckets

    if args.dry_run:
        print(json.dumps(buckets.plan(args.inputs, args.outputs, args.infrequent_after, args.archive_after), indent=2))
        return EXIT_OK
    steps = buckets.setup(args.inputs, args.outputs, args.s3_endpoint, args.s3_addressing, args.infrequent_after,
                          args.archive_after)
    for step in steps:
        print(f"s3://{step.bucket}: {step.what}: {'applied' if step.ok else 'NOT applied: ' + step.detail}")
    failed = sum(not step.ok for step in steps)
    if not failed:
        print(f"all {len(steps)} settings applied")
        return EXIT_OK
    print(f"{failed} of {len(steps)} settings could NOT be applied through this store's S3 API: apply them in the "
          "store's console or with its own tool (`--dry-run` prints the documents)")
    return EXIT_FAILED
