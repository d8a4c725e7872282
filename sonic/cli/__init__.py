"""Command line: `python -m sonic <command>` (installed as `sonic-portrait` too).

One module per command group, each with `add_parsers(sub)` whose commands name their `run(args) -> exit status`:
`generate`, `lipsync`, `models` (download, convert), `batch`, `fleet` (submit, status, worker, db), `service`
(serve), `storage` (setup). This module builds
the parser, runs the command and turns its errors into messages and exit statuses (`sonic.exits`), for every
command in one place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from ..exits import EXIT_CANCELLED, EXIT_USAGE


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def face_box_arg(text: str) -> tuple[float, float, float, float]:
    from ..inputs.face import parse_face_box

    try:
        box = parse_face_box(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if box is None:
        raise argparse.ArgumentTypeError("expected X,Y,W,H in pixels, got an empty value")
    return box


def _as_module() -> bool:
    return os.path.basename(sys.argv[0]) in ("__main__.py", "-m", "-c", "")


def build_parser() -> argparse.ArgumentParser:
    from . import batch, fleet, generate, lipsync, models, service, storage

    parser = argparse.ArgumentParser(prog="python -m sonic" if _as_module() else "sonic-portrait",
                                     description="Sonic talking-head video generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (generate, lipsync, models, batch, fleet, service, storage):
        group.add_parsers(sub)
    return parser


def run_reporting(command: Callable[[], int], nothing_done: str | None = None) -> int:
    """Run a command; its errors become one `error:` line each on stderr and an exit status. `nothing_done` says
    what a rejected jobs file left undone ("nothing was submitted")."""
    from ..jobs.jobsfile import JobsError

    try:
        return command()
    except JobsError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {len(exc.problems)} problem(s); {nothing_done or 'nothing was done'}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 (below: only the store's, the database's and the broker's)
        if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "sqlalchemy", "alembic", "kombu", "amqp", "redis"):
            raise
        reason = " ".join(str(exc).split())[:400]
        print(f"error: {type(exc).__name__}: {reason} (check --s3-endpoint / SONIC_S3_ENDPOINT and the AWS_* "
              "credentials, --database / SONIC_DATABASE_URL, --broker / SONIC_BROKER_URL)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # writers remove their temporary files on the way out; batches stay resumable
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_reporting(lambda: args.run(args), getattr(args, "nothing_done", None))
