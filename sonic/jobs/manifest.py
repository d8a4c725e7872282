"""The manifest: one JSON line per finished job, appended as jobs finish; the last line of an id is its state.

It is the audit record that maps inputs to outputs, and what makes a batch resumable: a job whose last record is
`done` with an output of the recorded sha256 is not run again. A local manifest is appended and flushed to disk
line by line (a crash loses at most the line being written, which the reader ignores); an s3:// manifest is
rewritten whole after each job (S3 objects cannot be appended to; each write replaces the object atomically).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

FIELDS = ("id", "status", "output", "url", "sha256", "bytes", "server", "prompt_id", "attempts", "seconds", "error",
          "offset", "confidence")


def make_record(job, status: str, **fields) -> dict:
    """A manifest line: every field present (None when it does not apply), then the job's inputs."""
    record = dict.fromkeys(FIELDS)
    record.update(id=job.id, status=status, attempts=0)
    record.update(fields)
    record.update(job.describe())
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


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


class Manifest:
    def __init__(self, location: str, s3=None):
        self.location, self.s3, self.cut_line = location, s3, False
        self.lock = threading.Lock()
        if location.startswith("s3://"):
            data = s3.read(location)
            self.lines = [line for line in (data or b"").decode().splitlines() if line.strip()]
        else:
            path = Path(location)
            if path.parent and not path.parent.is_dir():
                raise ValueError(f"--manifest: folder {path.parent} does not exist")
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            self.lines = text.splitlines()
            self.cut_line = bool(text) and not text.endswith("\n")  # the last write was cut short
        self.latest = {record["id"]: record for record in parse_lines("\n".join(self.lines))}

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self.lock:
            self.lines.append(line)
            self.latest[record["id"]] = record
            if self.location.startswith("s3://"):
                self.s3.write(self.location, ("\n".join(self.lines) + "\n").encode(), "application/x-ndjson")
            else:
                with open(self.location, "a", encoding="utf-8") as f:
                    f.write(("\n" if self.cut_line else "") + line + "\n")
                    self.cut_line = False
                    f.flush()
                    os.fsync(f.fileno())
