"""`python -m sonic submit` and `python -m sonic status`: a batch's life seen from any machine. The batch lives in
the object store (`store.py` has its layout)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

from ..exits import EXIT_FAILED, EXIT_OK
from ..jobs.jobsfile import Workflow, load_jobs
from ..jobs.storage import S3, split_s3
from .queue import QUEUE, TASK, broker_url, make_app
from .store import BatchStore

SCHEMA_SNAPSHOT = Path(__file__).resolve().parents[1] / "jobs" / "sonic_nodes.json"


def node_schema(server: str | None) -> dict:
    """Node definitions to check jobs against: a ComfyUI server's /object_info when given, else the snapshot of
    this pack's nodes that ships with it (file choices such as the model name are checked by the workers' ComfyUI)."""
    if server:
        from ..jobs.comfy_api import ComfyServer

        return ComfyServer(server).object_info()
    return json.loads(SCHEMA_SNAPSHOT.read_text())


def message_schema(workflow: Workflow, schema: dict, columns: set[str]) -> dict:
    """Only what a worker needs to bind the jobs' columns (a queue message stays small)."""
    subset = {}
    for class_type in workflow.class_types():
        info = schema.get(class_type, {}).get("input", {})
        specs = {name: spec for part in ("required", "optional") for name, spec in info.get(part, {}).items()
                 if name in columns}
        subset[class_type] = {"input": {"required": specs}}
    return subset


def submit(jobs_path: Path, broker: str | None, out: str, workflow_path: Path | None = None, retries: int = 2,
           url_expiry_s: int = 7200, batch: str | None = None, server: str | None = None,
           s3_endpoint: str | None = None, s3_addressing: str = "auto", backoff_s: float = 5.0) -> str:
    """Check every job (as `batch` does), upload local inputs, queue one task per job; -> the batch's URI."""
    if not out.startswith("s3://"):
        raise ValueError(f"--out must be s3://bucket/prefix (workers on other machines store there), got {out!r}")
    if retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {retries}")
    broker = broker_url(broker)
    workflow = Workflow.load(workflow_path)
    schema = node_schema(server)
    jobs = load_jobs(Path(jobs_path), workflow, schema)
    s3 = S3(s3_endpoint, s3_addressing)
    s3.check_bucket(out)
    batch = batch or time.strftime("b%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    if not all(c.isalnum() or c in "-_." for c in batch):
        raise ValueError(f"--batch {batch!r}: use letters, digits, '-', '_' or '.'")
    store = BatchStore.create(s3, out, batch, url_expiry_s)
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
    common = {"batch": store.uri, "workflow": workflow.prompt, "workflow_name": workflow.path.name,
              "workflow_digest": workflow.digest, "schema": message_schema(workflow, schema, columns),
              "retries": retries, "backoff_s": backoff_s, "url_expiry": url_expiry_s}
    descriptor = {**common, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "jobs": [job.to_message() for job in jobs]}
    store.write_descriptor(descriptor)
    app = make_app(broker)
    with app.producer_or_acquire() as producer:
        for job in jobs:
            app.send_task(TASK, args=[{**common, "job": job.to_message()}], task_id=f"{batch}:{job.id}",
                          queue=QUEUE, producer=producer)
    return store.uri


def waiting_in_queue(broker: str | None) -> int | None:
    """Messages waiting in the broker's queue (all batches), or None when no broker is known or it does not answer."""
    try:
        app = make_app(broker_url(broker))
        with app.connection_for_read() as connection:
            return connection.default_channel.queue_declare(QUEUE, passive=True).message_count
    except Exception:  # noqa: BLE001 (the store alone still tells the batch's state)
        return None


def status(batch_uri: str, broker: str | None, wait: bool = False, as_json: bool = False,
           manifest: str | None = None, s3_endpoint: str | None = None, s3_addressing: str = "auto",
           poll_s: float = 2.0) -> int:
    """Print a batch's progress; with wait, follow it to the end and write its manifest. -> exit status."""
    split_s3(batch_uri)
    s3 = S3(s3_endpoint, s3_addressing)
    store, descriptor = BatchStore.open(s3, batch_uri)
    ids = [job["id"] for job in descriptor["jobs"]]
    batch_name = store.name
    bar, last = None, None
    if wait and not as_json:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="job", desc=batch_name, file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            records = store.records()
            counts = {state: sum(r["status"] == state for r in records.values()) for state in ("done", "failed", "running")}
            counts["queued"] = max(len(ids) - sum(counts.values()), 0)
            workers = {}
            for record in records.values():
                entry = workers.setdefault(record.get("worker") or "?", {"done": 0, "failed": 0, "running": []})
                if record["status"] == "running":
                    entry["running"].append(record["id"])
                else:
                    entry[record["status"]] += 1
            failed_jobs = [{"id": r["id"], "error": r.get("error")} for r in records.values() if r["status"] == "failed"]
            report = {"batch": descriptor["batch"], "jobs": len(ids), **counts, "workers": workers,
                      "failed_jobs": sorted(failed_jobs, key=lambda f: f["id"]), "broker_waiting": waiting_in_queue(broker)}
            finished = counts["done"] + counts["failed"] >= len(ids)
            if as_json and report != last:
                print(json.dumps(report), flush=True)
            elif bar is not None:
                bar.update(counts["done"] + counts["failed"] - bar.n)
                bar.set_postfix_str(f"done {counts['done']} failed {counts['failed']} running {counts['running']} "
                                    f"queued {counts['queued']}")
            elif not as_json:
                print(_describe(report))
            last = report
            if not wait:
                return EXIT_OK if counts["failed"] == 0 else EXIT_FAILED
            if finished:
                break
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()
    lines = []
    for job_id in ids:  # the batch runner's manifest, with links made now
        record = dict(records[job_id])
        if record["status"] == "done":
            record["url"] = s3.presign(record["output"], descriptor.get("url_expiry", 7200))
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    s3.write(store.outputs.manifest_location, text.encode(), "application/x-ndjson")
    if manifest:
        Path(manifest).write_text(text, encoding="utf-8")
    where = manifest or store.outputs.manifest_location
    if not as_json:
        for failed in report["failed_jobs"]:
            print(_failure_line(failed), file=sys.stderr)
        print(f"{counts['done']} done, {counts['failed']} failed; manifest: {where}", file=sys.stderr)
    else:
        print(json.dumps({"event": "finished", **counts, "manifest": where}), flush=True)
    return EXIT_OK if counts["failed"] == 0 else EXIT_FAILED


def _describe(report: dict) -> str:
    waiting = report["broker_waiting"]
    lines = [f"{report['batch']}: {report['jobs']} jobs: {report['done']} done, {report['failed']} failed, "
             f"{report['running']} running, {report['queued']} queued"
             + (f" ({waiting} message(s) waiting in the broker's queue, all batches)" if waiting is not None else "")]
    for worker, entry in sorted(report["workers"].items()):
        running = f", running {', '.join(entry['running'])}" if entry["running"] else ""
        lines.append(f"  {worker}: {entry['done']} done, {entry['failed']} failed{running}")
    lines.extend(_failure_line(failed) for failed in report["failed_jobs"])
    return "\n".join(lines)


def _failure_line(failed: dict) -> str:
    reason = " ".join((failed["error"] or "no reason recorded").split())  # one line
    return f"  failed {failed['id']}: {reason if len(reason) <= 240 else reason[:239] + '…'}"
