"""A fleet batch's objects in the store, the one place that knows their layout (the job database holds everything
else: the jobs, their states, their attempts):

    <out>/<batch>/<id>.mp4                      each job's output, with its parameters, prompt id and sha256 as metadata
    <out>/<batch>/attempts/<id>.<token>.mp4     an attempt's output before the database accepted it (then copied
                                                to <id>.mp4 and removed): a late attempt never overwrites a result
    <out>/<batch>/manifest.jsonl                the manifest exported from the database once all jobs finished
    <out>/inputs/<batch>/<sha256><suffix>       local input files uploaded once by submit
"""

from __future__ import annotations

from ..jobs.storage import S3, S3Outputs

MANIFEST = "manifest.jsonl"


class BatchStore:
    """One batch's folder in the object store (`<out>/<batch>/`)."""

    def __init__(self, s3: S3, uri: str, url_expiry_s: int = 7200):
        self.s3, self.uri = s3, uri.rstrip("/")
        self.outputs = S3Outputs(s3, self.uri, url_expiry_s, check=False)  # the layout and metadata of batch runs

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def input_uri(self, sha256: str, suffix: str) -> str:
        """Where a local input file of this batch is uploaded: beside the batch folders, by content."""
        out = self.uri.rsplit("/", 1)[0]
        return f"{out}/inputs/{self.name}/{sha256}{suffix}"

    def output_uri(self, job_name: str) -> str:
        return self.outputs.location(job_name)

    def staged_uri(self, job_name: str, token: int) -> str:
        return f"{self.uri}/attempts/{job_name}.{token}.mp4"

    @property
    def manifest_uri(self) -> str:
        return f"{self.uri}/{MANIFEST}"
