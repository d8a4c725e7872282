"""What the service does with jobs, without HTTP: where a tenant's inputs and outputs live in the store, a request
checked exactly as `submit` checks a jobs file, one job or a batch recorded in one transaction (with its
Idempotency-Key or the upload that triggered it), the job's public view. Used by the API (app.py) and the upload
triggers (triggers.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger("sonic.service")
PRESETS = {"quick": {"steps": 15, "min_resolution": 512}, "high_quality": {"steps": 25, "min_resolution": 768}}


def presets() -> dict[str, dict]:
    """The presets: ours, with the operator's SONIC_PRESETS (a JSON object of name -> workflow inputs) over them."""
    text = os.environ.get("SONIC_PRESETS", "").strip()
    if not text:
        return PRESETS
    try:
        extra = json.loads(text)
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError
    except ValueError:
        raise ValueError("SONIC_PRESETS: give a JSON object of preset name -> {input: value}") from None
    return {**PRESETS, **extra}
STATES = ("queued", "running", "done", "failed", "cancelled")
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
AUDIO_TYPES = {"audio/wav": ".wav", "audio/mpeg": ".mp3", "audio/flac": ".flac", "audio/ogg": ".ogg",
               "audio/mp4": ".m4a"}


class ServiceError(Exception):
    """A request the service refuses: HTTP status, what was wrong and what to do, the field it names."""

    def __init__(self, status: int, error: str, field: str | None = None):
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def sniff(data: bytes, kind: str) -> str | None:
    """The content type of an image or a recording from its first bytes, or None when it is not one we take."""
    head = data[:16]
    if kind == "image":
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return "image/png"
        if head.startswith(b"\xff\xd8\xff"):
            return "image/jpeg"
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return "image/webp"
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if head[4:8] == b"ftyp":
        return "audio/mp4"
    return None


def check_public_url(url: str, field: str) -> None:
    """Refuse URLs to the service's own network (SONIC_URL_ALLOW lets an operator allow some)."""
    import socket
    import urllib.parse

    from ..inputs.urls import check_address

    try:
        parsed = urllib.parse.urlparse(url)
        scheme, host = parsed.scheme, parsed.hostname
        parsed.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        scheme = host = None
    if scheme not in ("http", "https") or not host:
        raise ServiceError(422, f"{field}: give an http(s) URL with a host name", field)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        raise ServiceError(422, f"{field}: the host {host!r} does not resolve", field) from None
    for address in addresses:
        try:
            check_address(host, address)
        except PermissionError as exc:
            raise ServiceError(422, f"{field}: {exc}", field) from None


def checked_jobs(rows: list[dict], suffix: str = ".jsonl"):
    """Rows as a jobs file, checked exactly as `submit` checks one -> Jobs. A problem -> ServiceError 422 naming
    the field (`image`, `audio`, `params.<name>`, or `jobs` with the row for a batch)."""
    from ..fleet.batches import node_schema
    from ..jobs.jobsfile import JobsError, Workflow, load_jobs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"request{suffix}"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        try:
            return load_jobs(path, Workflow.load(None), node_schema(None))
        except JobsError as exc:
            problem = exc.problems[0]
            where, _, problem = problem.partition(": ") if problem.startswith("request") else ("", "", problem)
            field = None
            if problem.startswith("column "):
                word = problem.split()[1]
                name = word.strip("':")
                field = name if name in ("image", "audio") else f"params.{name}"
                problem = problem.replace(f"column {word}", f"{field}{':' if word.endswith(':') else ''}", 1)
            if len(rows) > 1:  # a batch: say which row
                line = where.split(" line ", 1)[-1] if " line " in where else ""
                problem = f"jobs row {line}: {problem}" if line else problem
                field = "jobs"
            more = f" (and {len(exc.problems) - 1} more problem(s))" if len(exc.problems) > 1 else ""
            raise ServiceError(422, problem.replace("leave the cell empty", "leave it out") + more, field) from None
        except ValueError as exc:
            raise ServiceError(422, str(exc).replace(str(path), "the jobs"), "jobs") from None


class JobService:
    """The service's jobs on the job database and the store (S3 or the embedded folder store)."""

    def __init__(self, db, store, store_uri: str, url_expiry_s: int, ring=None):
        self.db, self.store, self.url_expiry_s, self.ring = db, store, url_expiry_s, ring
        self.store_uri = store_uri.rstrip("/")

    # -- where things live -----------------------------------------------------------------------------------
    def uri(self, key: str) -> str:
        bucket, _, prefix = self.store_uri[5:].partition("/")
        return f"s3://{bucket}/{prefix.strip('/') + '/' if prefix.strip('/') else ''}{key}"

    def key_of(self, uri: str) -> str:
        return uri[len(self.uri("")):]

    def upload_key(self, tenant: str, name: str, suffix: str, tag: str | None = None) -> str:
        """inputs/<tenant>/<yyyy>/<mm>/<dd>/<tag>-<name><suffix>: a tenant's uploads, by day. `tag`: the content's
        sha256 (the same file uploaded again is the same object: a retried request is the same request), else
        random."""
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(name or "upload").stem)[:60] or "upload"
        tag = (tag or uuid.uuid4().hex)[:16]
        return f"inputs/{tenant}/{time.strftime('%Y/%m/%d', time.gmtime())}/{tag}-{stem}{suffix}"

    def source(self, value, field: str, tenant: str) -> str:
        """An http(s) URL (public addresses only) or a key under the tenant's inputs/<tenant>/ -> a jobs-file
        source."""
        if not isinstance(value, str) or not value.strip():
            raise ServiceError(422, f"{field}: give an http(s) URL or a key in the store (inputs/{tenant}/...)", field)
        text = value.strip()
        if text.startswith(("http://", "https://")):
            check_public_url(text, field)
            return text
        if "://" in text:
            raise ServiceError(422, f"{field}: give an http(s) URL or a key in the store (inputs/{tenant}/...)", field)
        key = text.lstrip("/")
        if not key.startswith(f"inputs/{tenant}/") or any(part in ("", ".", "..") for part in key.split("/")):
            raise ServiceError(422, f"{field}: a store key must be under inputs/{tenant}/ (your uploads), got {text!r}",
                               field)
        return self.uri(key)

    def params(self, params, preset: str | None) -> dict:
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ServiceError(422, "params: give a JSON object of workflow inputs by name, e.g. {\"seed\": 7}",
                               "params")
        known = presets()
        if preset is not None and preset not in known:
            raise ServiceError(422, f"preset: {preset!r} is not one of {', '.join(known)}", "preset")
        for name in ("id", "image", "audio"):
            if name in params:
                raise ServiceError(422, f"params.{name}: give {name} beside params, not in them", f"params.{name}")
        return {**known.get(preset or "", {}), **params}

    def webhook(self, url) -> str | None:
        if url in (None, ""):
            return None
        if not isinstance(url, str) or len(url) > 2048:
            raise ServiceError(422, "webhook_url: give an http(s) URL (at most 2048 characters)", "webhook_url")
        check_public_url(url, "webhook_url")
        return url

    # -- making jobs -----------------------------------------------------------------------------------------
    def create(self, tenant: str, image: str, audio: str, params: dict, webhook_url: str | None = None,
               idempotency_key: str | None = None, trigger: dict | None = None,
               cleanup: list[str] | None = None) -> tuple[dict, bool]:
        """One job (a batch of one named j_...) -> (its row, created). The same Idempotency-Key with the same
        request -> the first job, created False; with another request -> 422. `cleanup`: objects this request
        stored, removed when no job records them (nothing half-stored)."""
        row = {"id": "job", "image": image, "audio": audio, **params}
        try:
            if idempotency_key:
                found = self.replay(tenant, idempotency_key, row)
                if found is not None:
                    self._remove(cleanup)
                    return found, False
            jobs = checked_jobs([row])
            name = "j_" + uuid.uuid4().hex[:20]
            try:
                batch_id = self._record(tenant, name, jobs, webhook_url, idempotency_key, trigger)
            except _Raced:
                found = self.replay(tenant, idempotency_key or "", row)
                if found is None:
                    raise
                self._remove(cleanup)
                return found, False
        except BaseException:
            self._remove(cleanup)
            raise
        self._ring(batch_id, name)
        return self.db.tenant_job(tenant, name), True

    def create_batch(self, tenant: str, rows: list[dict], webhook_url: str | None = None,
                     idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Many jobs (a jobs file's rows, sources already checked) -> (the batch row, created)."""
        if idempotency_key:
            found = self.db.batch_by_idempotency(tenant, idempotency_key)
            if found is not None:
                if found["jobs_digest"] != self._digest(tenant, rows):
                    raise ServiceError(422, "this Idempotency-Key was used for another request; use a new key",
                                       "Idempotency-Key")
                return found, False
        jobs = checked_jobs(rows)
        name = "b_" + uuid.uuid4().hex[:20]
        try:
            batch_id = self._record(tenant, name, jobs, webhook_url, idempotency_key, None)
        except _Raced:
            found = self.db.batch_by_idempotency(tenant, idempotency_key or "")
            if found is None:
                raise
            return found, False
        self._ring(batch_id, name)
        return self.db.tenant_batch(tenant, name), True

    def _digest(self, tenant: str, rows: list[dict]) -> str:
        from ..fleet.batches import job_row
        from ..jobdb.db import jobs_digest

        return jobs_digest([job_row(job) for job in checked_jobs(rows)])

    def replay(self, tenant: str, idempotency_key: str, row: dict) -> dict | None:
        found = self.db.batch_by_idempotency(tenant, idempotency_key)
        if found is None:
            return None
        job = self.db.tenant_job(tenant, found["name"])
        if job is None or _request_digest(job["spec"]) != _request_digest(
                {"params": checked_jobs([row])[0].params, "image": row["image"], "audio": row["audio"]}):
            raise ServiceError(422, "this Idempotency-Key was used for another request; use a new key",
                               "Idempotency-Key")
        return job

    def _record(self, tenant: str, name: str, jobs, webhook_url, idempotency_key, trigger) -> int:
        from sqlalchemy.exc import IntegrityError

        from ..fleet.batches import binding_schema, job_row, node_schema
        from ..jobs.jobsfile import Workflow

        workflow = Workflow.load(None)
        columns = set().union(*(set(job.params) for job in jobs))
        record = {"name": name, "uri": self.uri(f"{tenant}/jobs/{name}"), "tenant": tenant,
                  "workflow": workflow.prompt, "workflow_name": workflow.path.name, "workflow_digest": workflow.digest,
                  "schema": binding_schema(workflow, node_schema(None), columns), "retries": 2, "backoff_s": 5.0,
                  "url_expiry_s": self.url_expiry_s, "idempotency_key": idempotency_key, "webhook_url": webhook_url}
        try:
            batch_id, _ = self.db.create_batch(record, [job_row(job) for job in jobs], trigger)
        except IntegrityError:  # the same Idempotency-Key at the same moment
            raise _Raced() from None
        return batch_id

    def _ring(self, batch_id: int, name: str) -> None:
        if self.ring is None:
            return  # embedded: the executor takes due jobs from the database
        try:
            due = self.db.due(batch_id=batch_id)
            self.ring([job_id for job_id, _ in due])
            self.db.rang(due)
        except Exception as exc:  # noqa: BLE001 (recorded: the workers' reconciler queues it)
            log.warning("%s recorded, not yet queued: %s", name, exc)

    def _remove(self, uris: list[str] | None) -> None:
        for uri in uris or ():
            try:
                self.store.delete(uri)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove the upload %s: %s", uri, exc)

    # -- the public view -------------------------------------------------------------------------------------
    def view(self, row: dict, base: str = "") -> dict:
        from ..jobdb.db import public_job_id

        output = None
        if row["state"] == "done" and row["output_key"]:
            output = {"url": self.link(row["output_key"], row["url_expiry_s"], base),
                      "expires_at": iso(time.time() + row["url_expiry_s"]), "sha256": row["sha256"],
                      "bytes": row["bytes"]}
        progress = None
        if row["state"] == "running" and row.get("progress_max"):
            progress = {"value": row["progress_value"] or 0, "max": row["progress_max"]}
        elif row["state"] == "done" and row.get("progress_max"):
            progress = {"value": row["progress_max"], "max": row["progress_max"]}
        return {"id": public_job_id(row["batch_name"], row["name"]), "state": row["state"],
                "batch": None if row["batch_name"].startswith("j_") else row["batch_name"],
                "queue_position": self.db.queue_position(row["id"]) if row["state"] == "queued" else None,
                "progress": progress, "output": output,
                "error": row["error"] if row["state"] in ("failed", "cancelled") else None,
                "waiting_reason": row["error"] if row["state"] == "queued" else None,
                "inputs": {"image": _public_source(row["spec"]["image"], self),
                           "audio": _public_source(row["spec"]["audio"], self)},
                "params": row["spec"].get("params") or {},
                "timings": row["timings"], "lipsync": row["lipsync"], "attempts": row["attempts"],
                "created_at": iso(row["created_at"]), "started_at": iso(row["started_at"]),
                "finished_at": iso(row["finished_at"])}

    def link(self, uri: str, expiry_s: int, base: str = "") -> str:
        if hasattr(self.store, "link_ok"):  # the embedded folder store: the service's own signed links
            return self.store.presign(uri, expiry_s, base)
        return self.store.presign(uri, expiry_s)


class _Raced(Exception):
    pass


def _request_digest(spec: dict) -> str:
    def where(source):
        return source["location"] if isinstance(source, dict) else source

    return hashlib.sha256(json.dumps([spec.get("params") or {}, where(spec["image"]), where(spec["audio"])],
                                     sort_keys=True).encode()).hexdigest()


def _public_source(source: dict, service: JobService) -> str:
    """An input as the tenant named it: its store key, or its URL without the query string."""
    location = source.get("location", "")
    if location.startswith(service.uri("")):
        return service.key_of(location)
    return location.split("?", 1)[0]


def iso(stamp: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp else None
