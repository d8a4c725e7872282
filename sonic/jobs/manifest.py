"""The manifest: one JSON line per finished job; the last line of an id is its state.

It is the audit record that maps inputs to outputs, and what makes a batch resumable: a job whose last record is
`done` with an output of the recorded sha256 is not run again.

A local manifest is appended and flushed to disk line by line (a crash loses at most the line being written, which
the reader ignores).

An s3:// manifest cannot be appended to (S3 objects are written whole), and rewriting it after every job would cost
the square of the batch's size. So each finished job's line is first written as one small object of its own,
`<manifest name without .jsonl>.d/<run>-<sequence>-<id>.jsonl` beside the manifest (`<prefix>/manifest.d/...` for
the default `<prefix>/manifest.jsonl`): one PUT of one line per job, durable at once. The whole manifest is
rewritten, and the pieces it now holds deleted, at the end of the run (done, failed, cancelled, stopped) and while
it runs at most every `CONSOLIDATE_S` seconds and only once the pieces are a tenth of the manifest (so the bytes
rewritten stay proportional to the batch, not to its square). Reading one back (resume) takes the whole manifest,
then the pieces in name order (a run's name starts with its UTC start time, and runs on one prefix follow each
other: the runner locks it), and folds leftover pieces of a run that crashed into the whole manifest at once. A
line that is both in the manifest and in a piece (a crash between the rewrite and the deletes) counts once.

A job whose output was stored but whose line was never written (a crash in between) is found again from the output
object's metadata (its job key and sha256) by the runner's resume, not from here.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

FIELDS = ("id", "status", "output", "url", "sha256", "bytes", "server", "prompt_id", "attempts", "seconds", "error",
          "offset", "confidence")
# the batch runner's records also say what Lip-Sync Calibrate did (None without that node, or for a failed job)
LIPSYNC_FIELDS = ("lipsync_applied", "lipsync_applied_s", "lipsync_warning", "lipsync_message")
CONSOLIDATE_S = 300.0  # an s3:// manifest is rewritten whole at most this often while a batch runs (and at its end)
CONSOLIDATE_SHARE = 10  # ... and only once its pieces are at least 1/CONSOLIDATE_SHARE of its lines


def make_record(job, status: str, **fields) -> dict:
    """A manifest line: every field present (None when it does not apply), then the job's inputs."""
    record = dict.fromkeys(FIELDS + LIPSYNC_FIELDS)
    record.update(id=job.id, status=status, attempts=0)
    record.update(fields)
    record.update(job.describe())
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def lipsync_fields(workflow, history: dict) -> dict:
    """What the workflow's Lip-Sync Calibrate node measured and did, from its UI output in the prompt's history:
    offset and confidence (the measurement), lipsync_applied (whether the audio was moved: a measured correction
    and/or the manual lip_sync_offset), lipsync_applied_s (by how much, positive = audio later), lipsync_warning (a
    measurement that was not trusted) and lipsync_message (the node's own words). {} without that node."""
    from .jobsfile import LIPSYNC

    for node_id in workflow.nodes(LIPSYNC):
        measured = (history.get("outputs", {}).get(node_id) or {}).get("lipsync") or []
        if measured:
            ui = measured[0]
            applied = ui.get("applied_s")
            return {"offset": ui.get("offset_s"), "confidence": ui.get("confidence"),
                    "lipsync_applied": None if applied is None else bool(applied),
                    "lipsync_applied_s": applied, "lipsync_warning": ui.get("warning"),
                    "lipsync_message": ui.get("message")}
    return {}


def timings(started: float, inputs_done: float, comfyui_done: float, history: dict) -> dict:
    """Where an attempt's time went (s, from time.monotonic() stamps): inputs to the server, waiting in its
    queue, running there (ComfyUI's own execution_start..execution_success), fetching and storing the output."""
    from .comfy_api import execution_seconds

    at_server = comfyui_done - inputs_done
    running = execution_seconds(history)
    running = at_server if running is None else running
    return {"inputs": round(inputs_done - started, 3), "queued": round(max(at_server - running, 0.0), 3),
            "running": round(running, 3), "output": round(time.monotonic() - comfyui_done, 3)}


def parse_lines(text: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def pieces_prefix(location: str) -> str:
    """s3://b/p/manifest.jsonl -> s3://b/p/manifest.d/ (where an s3:// manifest's per-job pieces go)."""
    folder, _, name = location.rpartition("/")
    stem = name.removesuffix(".jsonl")
    return f"{folder}/{stem}.d/"


class Manifest:
    def __init__(self, location: str, s3=None):
        self.location, self.s3, self.cut_line = location, s3, False
        self.lock = threading.Lock()
        self.pieces: list[str] = []  # s3:// pieces whose lines the whole manifest object does not hold yet
        if location.startswith("s3://"):
            data = s3.read(location)
            self.lines = [line for line in (data or b"").decode().splitlines() if line.strip()]
            self.pieces_prefix = pieces_prefix(location)
            self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            self.sequence, self.written_at = 0, time.monotonic()
            known = set(self.lines)
            for uri in sorted(s3.keys(self.pieces_prefix)):  # a run that crashed before rewriting the manifest
                for line in (s3.read(uri) or b"").decode().splitlines():
                    if line.strip() and line not in known:
                        self.lines.append(line)
                        known.add(line)
                self.pieces.append(uri)
            if self.pieces:  # folded in now: this run's own pieces are then the only ones (their order is ours)
                self._consolidate()
        else:
            path = Path(location)
            if path.parent and not path.parent.is_dir():
                raise ValueError(f"--manifest: folder {path.parent} does not exist")
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            self.lines = text.splitlines()
            self.cut_line = bool(text) and not text.endswith("\n")  # the last write was cut short
        self.latest = {record["id"]: record for record in parse_lines("\n".join(self.lines))}

    @property
    def remote(self) -> bool:
        return self.location.startswith("s3://")

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock:
            self.lines.append(line)
            self.latest[record["id"]] = record
            if self.remote:
                uri = f"{self.pieces_prefix}{self.run}-{self.sequence:08d}-{record['id']}.jsonl"
                self.sequence += 1
                self.s3.write(uri, (line + "\n").encode(), "application/x-ndjson")
                self.pieces.append(uri)
                if (time.monotonic() - self.written_at >= CONSOLIDATE_S
                        and len(self.pieces) * CONSOLIDATE_SHARE >= len(self.lines)):
                    self._consolidate()
            else:
                with open(self.location, "a", encoding="utf-8") as f:
                    f.write(("\n" if self.cut_line else "") + line + "\n")
                    self.cut_line = False
                    f.flush()
                    os.fsync(f.fileno())

    def close(self) -> None:
        """An s3:// manifest: its pieces folded into the whole object (the end of a run, however it ends)."""
        if self.remote:
            with self.lock:
                if self.pieces:
                    self._consolidate()

    def _consolidate(self) -> None:
        """The whole manifest written, then the pieces it now holds deleted (a crash in between leaves pieces whose
        lines the manifest already has: read back, they count once)."""
        self.s3.write(self.location, ("\n".join(self.lines) + "\n").encode(), "application/x-ndjson")
        self.written_at = time.monotonic()
        done, self.pieces = self.pieces, []
        _delete_all(self.s3, done)


def _delete_all(s3, uris: list[str]) -> None:
    """Delete objects of one bucket, a thousand per request (DeleteObjects), one by one where that is refused."""
    from botocore.exceptions import ClientError

    from .storage import split_s3

    for start in range(0, len(uris), 1000):
        chunk = uris[start:start + 1000]
        bucket = split_s3(chunk[0])[0]
        try:
            reply = s3.client.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": split_s3(uri)[1]} for uri in chunk], "Quiet": True})
            if reply.get("Errors"):
                raise RuntimeError(reply["Errors"][0])
        except (ClientError, RuntimeError):
            for uri in chunk:
                s3.delete(uri)
