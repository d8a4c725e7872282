"""A fleet batch in the object store, the one place that knows its layout. The state outlives workers and broker:

    <out>/<batch>/batch.json          the jobs, the workflow and the settings (written by submit)
    <out>/<batch>/<id>.mp4            each job's output, with its parameters, prompt id and sha256 as metadata
    <out>/<batch>/records/<id>.json   each job's record (running, done, failed), written by the workers
    <out>/<batch>/manifest.jsonl      the batch runner's manifest, written by `status --wait` once all finished
    <out>/inputs/<batch>/<sha256><suffix>   local input files uploaded once by submit (workers only see s3:// and
                                            http(s):// inputs)
"""

from __future__ import annotations

import json

from ..jobs.jobsfile import Job
from ..jobs.manifest import make_record
from ..jobs.storage import S3, S3Outputs

DESCRIPTOR = "batch.json"


class BatchStore:
    """One batch's folder in the object store (`<out>/<batch>/`)."""

    def __init__(self, s3: S3, uri: str, url_expiry_s: int = 7200):
        self.s3, self.uri = s3, uri.rstrip("/")
        self.outputs = S3Outputs(s3, self.uri, url_expiry_s, check=False)  # the layout and metadata of batch runs

    @classmethod
    def create(cls, s3: S3, out: str, batch: str, url_expiry_s: int) -> "BatchStore":
        """A new batch's folder under `out`; refused when the batch exists already."""
        store = cls(s3, f"{out.rstrip('/')}/{batch}", url_expiry_s)
        if s3.read(store.descriptor_uri) is not None:
            raise ValueError(f"batch {store.uri} exists already; choose another --batch name")
        return store

    @classmethod
    def open(cls, s3: S3, uri: str) -> tuple["BatchStore", dict]:
        """An existing batch and its descriptor (the jobs, the workflow, the settings submit chose)."""
        data = s3.read(f"{uri.rstrip('/')}/{DESCRIPTOR}")
        if data is None:
            raise ValueError(f"{uri} is not a batch (no {DESCRIPTOR} there); give what `submit` printed")
        descriptor = json.loads(data)
        return cls(s3, descriptor["batch"], descriptor.get("url_expiry", 7200)), descriptor

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def descriptor_uri(self) -> str:
        return f"{self.uri}/{DESCRIPTOR}"

    def write_descriptor(self, descriptor: dict) -> None:
        self.s3.write(self.descriptor_uri, json.dumps(descriptor).encode(), "application/json")

    def input_uri(self, sha256: str, suffix: str) -> str:
        """Where a local input file of this batch is uploaded: beside the batch folders, by content."""
        out = self.uri.rsplit("/", 1)[0]
        return f"{out}/inputs/{self.name}/{sha256}{suffix}"

    def record_uri(self, job_id: str) -> str:
        return f"{self.uri}/records/{job_id}.json"

    def read_record(self, job_id: str) -> dict | None:
        data = self.s3.read(self.record_uri(job_id))
        return json.loads(data) if data else None

    def write_record(self, record: dict) -> None:
        self.s3.write(self.record_uri(record["id"]), json.dumps(record).encode(), "application/json")

    def records(self) -> dict[str, dict]:
        found = {}
        for uri in self.s3.keys(f"{self.uri}/records/"):
            data = self.s3.read(uri)
            if data:
                record = json.loads(data)
                found[record["id"]] = record
        return found

    def finished(self, job: Job) -> dict | None:
        """The job's final record when it needs no (further) run: done with its output in place, or failed."""
        record = self.read_record(job.id)
        existing = self.outputs.existing(job.id)
        if record and record.get("key") == job.key:
            if record["status"] == "failed":
                return record
            if record["status"] == "done" and existing and existing["sha256"] == record["sha256"]:
                return record
        if existing and existing["metadata"].get("sonic-job-key") == job.key:  # stored; the worker died before the record
            record = make_record(job, "done", output=self.outputs.location(job.id), sha256=existing["sha256"],
                                 bytes=existing["bytes"], prompt_id=existing["metadata"].get("sonic-prompt-id"),
                                 recovered=True)
            self.write_record(record)
            return record
        return None
