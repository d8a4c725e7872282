"""`python -m sonic submit` and `python -m sonic status`: a batch's life seen from any machine. The job database
holds the batch (`sonic.jobdb`); the store holds its inputs and outputs (`store.py` has the layout)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from ..exits import EXIT_FAILED, EXIT_OK
from ..jobdb.db import JobDB
from ..jobs.jobsfile import Workflow, load_jobs
from ..jobs.storage import S3, check_url_expiry
from .queue import broker_url, check_broker, make_app, ring, waiting
from .reconcile import reconcile
from .store import BatchStore

SCHEMA_SNAPSHOT = Path(__file__).resolve().parents[1] / "jobs" / "sonic_nodes.json"


def node_schema(server: str | None) -> dict:
    """Node definitions to check jobs against: a ComfyUI server's /object_info when given, else the snapshot of
    this pack's nodes that ships with it (file choices such as the model name are checked by the workers)."""
    if server:
        from ..jobs.comfy_api import ComfyServer

        return ComfyServer(server).object_info()
    return json.loads(SCHEMA_SNAPSHOT.read_text())


def binding_schema(workflow: Workflow, schema: dict, columns: set[str]) -> dict:
    """Only what a worker needs to bind the jobs' columns."""
    subset = {}
    for class_type in workflow.class_types():
        info = schema.get(class_type, {}).get("input", {})
        specs = {name: spec for part in ("required", "optional") for name, spec in info.get(part, {}).items()
                 if name in columns}
        subset[class_type] = {"input": {"required": specs}}
    return subset


def job_row(job) -> dict:
    message = job.to_message()
    row = {"name": job.id, "key": job.key, "spec": message}
    for column in ("image", "audio"):
        source = getattr(job, column)
        row[f"{column}_key"] = source.location
        row[f"{column}_sha256"] = source.sha256
    return row


def submit(jobs_path: Path, broker: str | None, out: str, database: str, workflow_path: Path | None = None,
           retries: int = 2, url_expiry_s: int = 7200, batch: str | None = None, server: str | None = None,
           s3_endpoint: str | None = None, s3_addressing: str = "auto", backoff_s: float = 5.0,
           retry_failed: bool = False) -> str:
    """Check every job (as `batch` does), connect to the broker, upload local inputs, record the batch and all
    its jobs in one transaction, then ring one message per job; -> the batch's URI. Submitting the same jobs file
    as the same --batch again rings what was not rung (a submit that died half-way) and, with retry_failed,
    queues its failed jobs again."""
    if not out.startswith("s3://"):
        raise ValueError(f"--out must be s3://bucket/prefix (workers on other machines store there), got {out!r}")
    if retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {retries}")
    check_url_expiry(url_expiry_s)
    broker = broker_url(broker)
    if retry_failed and not batch:
        raise ValueError("--retry-failed needs --batch NAME (the batch whose failed jobs to queue again)")
    batch = batch or time.strftime("b%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    if not all(c.isalnum() or c in "-_." for c in batch):
        raise ValueError(f"--batch {batch!r}: use letters, digits, '-', '_' or '.'")
    workflow = Workflow.load(workflow_path)
    schema = node_schema(server)
    jobs = load_jobs(Path(jobs_path), workflow, schema)
    app = make_app(broker)
    check_broker(app, broker)
    db = JobDB(database)
    try:
        db.upgrade()
        s3 = S3(s3_endpoint, s3_addressing)
        s3.check_bucket(out)
        store = BatchStore(s3, f"{out.rstrip('/')}/{batch}", url_expiry_s)
        uploaded = {}
        for job in jobs:
            for column in ("image", "audio"):
                source = getattr(job, column)
                if source.kind != "file":
                    continue
                if source.sha256 not in uploaded:
                    target = store.input_uri(source.sha256, source.suffix)
                    if s3.head(target) is None:  # never twice
                        s3.upload(Path(source.location), target, {"sha256": source.sha256}, "application/octet-stream")
                    uploaded[source.sha256] = target
                setattr(job, column, replace(source, kind="s3", location=uploaded[source.sha256]))
        columns = {name for job in jobs for name in job.params}
        record = {"name": batch, "uri": store.uri, "workflow": workflow.prompt, "workflow_name": workflow.path.name,
                  "workflow_digest": workflow.digest, "schema": binding_schema(workflow, schema, columns),
                  "retries": retries, "backoff_s": backoff_s, "url_expiry_s": url_expiry_s}
        batch_id, created = db.create_batch(record, [job_row(job) for job in jobs])
        if not created and retry_failed:
            count = db.retry_failed(batch_id)
            print(f"{count} failed job(s) of {store.uri} queued again", file=sys.stderr)
        elif not created:
            print(f"{store.uri} was submitted before: ringing for its jobs that were never queued", file=sys.stderr)
        try:
            while due := db.due(batch_id=batch_id):
                ring(app, [job_id for job_id, _ in due])
                db.rang(due)
        except Exception as exc:  # noqa: BLE001 (the batch is recorded: nothing is lost)
            raise ConnectionError(f"{store.uri} is recorded in the job database, but queueing its jobs failed "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); the workers' "
                                  f"reconciler queues them, or run the same submit again with --batch "
                                  f"{store.name}") from None
    finally:
        db.close()
    return store.uri


def manifest_line(row: dict, s3: S3, url_expiry_s: int) -> dict:
    """A job's row -> the batch runner's manifest record, with a link made now."""
    from ..jobs.jobsfile import Job
    from ..jobs.manifest import FIELDS, LIPSYNC_FIELDS

    job = Job.from_message(row["spec"])
    record = dict.fromkeys(FIELDS + LIPSYNC_FIELDS)
    lipsync = row.get("lipsync") or {}
    record.update(id=row["name"], status=row["state"], output=row["output_key"], sha256=row["sha256"],
                  bytes=row["bytes"], server=row["server"], worker=row["worker"], prompt_id=row["prompt_id"],
                  attempts=row["attempts"], error=row["error"], timings=row["timings"], **lipsync)
    if row["started_at"] and row["finished_at"]:
        record["seconds"] = round(row["finished_at"] - row["started_at"], 2)
    if row["state"] == "done" and row["output_key"]:
        record["url"] = s3.presign(row["output_key"], url_expiry_s)
    record.update(job.describe())
    if row["finished_at"]:
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["finished_at"]))
    return record


def status(batch_ref: str, broker: str | None, database: str, wait: bool = False, as_json: bool = False,
           manifest: str | None = None, s3_endpoint: str | None = None, s3_addressing: str = "auto",
           poll_s: float = 2.0) -> int:
    """Print a batch's progress from the job database; with wait, follow it to the end (reconciling as it goes)
    and export its manifest. -> exit status (1 when any job failed)."""
    db = JobDB(database)
    try:
        db.check_schema()
        batch = db.batch(batch_ref)
        app = None
        try:
            app = make_app(broker_url(broker))
        except ValueError:
            pass  # no broker known: the database still tells the batch's state
        bar, last, total = None, None, None
        holder = f"status-{uuid.uuid4().hex[:8]}"  # this process's name for the reconciler's lock
        try:
            while True:
                counts = db.counts(batch["id"])
                total = sum(counts.values())
                failed = db.failed(batch["id"])
                report = {"batch": batch["uri"], "jobs": total, **counts, "workers": db.by_worker(batch["id"]),
                          "failed_jobs": failed, "waiting_jobs": db.waiting(batch["id"]),
                          "broker_waiting": waiting(app) if app is not None else None}
                finished = counts["queued"] + counts["running"] == 0
                if as_json and report != last:
                    print(json.dumps(report), flush=True)
                elif wait and not as_json:
                    if bar is None:
                        from tqdm import tqdm

                        bar = tqdm(total=total, unit="job", desc=batch["name"], file=sys.stderr, dynamic_ncols=True,
                                   smoothing=0)  # the rate over the whole wait, not over the polls
                    ended = total - counts["queued"] - counts["running"]
                    bar.update(ended - bar.n)
                    bar.set_postfix_str(f"done {counts['done']} failed {counts['failed']} running {counts['running']} "
                                        f"queued {counts['queued']}")
                elif not as_json:
                    print(_describe(report))
                last = report
                if not wait:
                    return EXIT_OK if counts["failed"] == 0 else EXIT_FAILED
                if finished:
                    break
                if app is not None:
                    try:
                        reconcile(db, app, holder, poll_s)
                    except Exception as exc:  # noqa: BLE001 (the workers reconcile too)
                        print(f"reconciler: {exc}", file=sys.stderr)
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()
        s3 = S3(s3_endpoint, s3_addressing)
        store = BatchStore(s3, batch["uri"], batch["url_expiry_s"])
        text = "".join(json.dumps(manifest_line(row, s3, batch["url_expiry_s"])) + "\n"
                       for row in db.job_rows(batch["id"]))
        s3.write(store.manifest_uri, text.encode(), "application/x-ndjson")
        if manifest:
            Path(manifest).write_text(text, encoding="utf-8")
        where = manifest or store.manifest_uri
        if not as_json:
            for one in report["failed_jobs"]:
                print(_failure_line(one), file=sys.stderr)
            print(f"{counts['done']} done, {counts['failed']} failed; manifest: {where}", file=sys.stderr)
        else:
            print(json.dumps({"event": "finished", **counts, "manifest": where}), flush=True)
        return EXIT_OK if counts["failed"] == 0 else EXIT_FAILED
    finally:
        db.close()


def _describe(report: dict) -> str:
    waiting_now = report["broker_waiting"]
    lines = [f"{report['batch']}: {report['jobs']} jobs: {report['done']} done, {report['failed']} failed, "
             f"{report['running']} running, {report['queued']} queued"
             + (f", {report['cancelled']} cancelled" if report.get("cancelled") else "")
             + (f" ({waiting_now} message(s) waiting in the broker's queue, all batches)"
                if waiting_now is not None else "")]
    for worker, entry in sorted(report["workers"].items()):
        running = f", running {', '.join(entry['running'])}" if entry["running"] else ""
        lines.append(f"  {worker}: {entry['done']} done, {entry['failed']} failed{running}")
    lines.extend(_failure_line(failed) for failed in report["failed_jobs"])
    lines.extend(_failure_line(handed, "waiting") for handed in report["waiting_jobs"])
    return "\n".join(lines)


def _failure_line(failed: dict, what: str = "failed") -> str:
    reason = " ".join((failed["error"] or "no reason recorded").split())  # one line
    return f"  {what} {failed['id']}: {reason if len(reason) <= 240 else reason[:239] + '…'}"
