"""The service's HTTP API (FastAPI). Every route but /healthz needs `Authorization: Bearer <api key>`; a tenant
sees, links and cancels only its own jobs (another tenant's job is 404, as a job that does not exist). A job is a
batch of one in the job database, run by the fleet's workers like any other.

Errors are JSON `{"error": what was wrong and what to do, "field": the field or header}` with a 4xx status.
"""


import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger("sonic.service")
PRESETS = {"quick": {"steps": 15, "min_resolution": 512}, "high_quality": {"steps": 25, "min_resolution": 768}}
MAX_BODY_BYTES = 64 * 1024
STATES = ("queued", "running", "done", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None):
        super().__init__(error)
        self.status, self.error, self.field = status, error, field


def create_app(database: str, store: str, broker: str | None = None, url_expiry_s: int = 7200,
               s3_endpoint: str | None = None, s3_addressing: str = "auto"):
    from fastapi import Depends, FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, Field

    from ..jobdb.db import DatabaseUnavailable, JobDB
    from ..jobdb.tenants import Tenants
    from ..jobs.storage import check_url_expiry

    if not store.startswith("s3://"):
        raise ValueError(f"--store must be s3://bucket/prefix (the workers store outputs there), got {store!r}")
    check_url_expiry(url_expiry_s)
    db = JobDB(database)
    db.upgrade()
    keys = Tenants(db)
    state = {"s3": None, "app": None}

    def s3():
        if state["s3"] is None:
            from ..jobs.storage import S3

            state["s3"] = S3(s3_endpoint, s3_addressing)
        return state["s3"]

    def broker_app():
        if broker and state["app"] is None:
            from ..fleet.queue import make_app

            state["app"] = make_app(broker)
        return state["app"]

    app = FastAPI(title="Sonic Portrait", version="1",
                  description="Talking-head videos from a portrait and a recording (Sonic), as jobs.")

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse({"error": exc.error, "field": exc.field}, status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return JSONResponse({"error": f"{field or 'body'}: {first.get('msg', 'invalid')}", "field": field},
                            status_code=422)

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(_request, exc):
        return JSONResponse({"error": "the job database is unreachable; try again shortly", "field": None},
                            status_code=503, headers={"Retry-After": "5"})

    def tenant(authorization: str | None = Header(None, description="Bearer <api key>")) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "give the header Authorization: Bearer <api key> (python -m sonic serve keys create)",
                           "Authorization")
        name = keys.tenant_of(authorization.split(None, 1)[1].strip())
        if name is None:
            raise ApiError(401, "this API key is not valid (unknown or revoked)", "Authorization")
        return name

    class JobIn(BaseModel):
        image: str = Field(description="http(s) URL, or the key of an object under inputs/<tenant>/ in the store")
        audio: str = Field(description="http(s) URL, or the key of an object under inputs/<tenant>/ in the store")
        params: dict = Field(default_factory=dict, description="workflow inputs by name, as in jobs files "
                                                               "(seed, steps, min_resolution, lip_sync_offset, ...)")
        preset: str | None = Field(None, description="quick or high_quality (params override it)")

    def source(value: str, field: str, who: str) -> str:
        text = value.strip()
        if text.startswith(("http://", "https://")):
            _check_public_url(text, field)
            return text
        if "://" in text:
            raise ApiError(422, f"{field}: give an http(s) URL or a key in the store (inputs/{who}/...)", field)
        key = text.lstrip("/")
        if not key.startswith(f"inputs/{who}/") or ".." in key.split("/"):
            raise ApiError(422, f"{field}: a store key must be under inputs/{who}/ (your uploads), got {text!r}",
                           field)
        bucket, prefix = store[5:].split("/", 1) if "/" in store[5:] else (store[5:], "")
        return f"s3://{bucket}/{prefix.strip('/') + '/' if prefix.strip('/') else ''}{key}"

    def view(row: dict) -> dict:
        output = None
        if row["state"] == "done" and row["output_key"]:
            output = {"url": s3().presign(row["output_key"], row["url_expiry_s"]),
                      "expires_at": _iso(time.time() + row["url_expiry_s"]), "sha256": row["sha256"],
                      "bytes": row["bytes"]}
        return {"id": row["batch_name"], "state": row["state"], "progress": None, "output": output,
                "error": row["error"] if row["state"] in ("failed", "cancelled") else None,
                "waiting_reason": row["error"] if row["state"] == "queued" else None,
                "timings": row["timings"], "lipsync": row["lipsync"], "attempts": row["attempts"],
                "created_at": _iso(row["created_at"]), "finished_at": _iso(row["finished_at"])}

    @app.get("/healthz", tags=["service"])
    def healthz():
        db.now()
        return {"ok": True}

    @app.post("/v1/jobs", status_code=201, tags=["jobs"])
    async def create_job(request: Request, body: JobIn, who: str = Depends(tenant),
                         idempotency_key: str | None = Header(None, max_length=200)):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", None)
        if body.preset is not None and body.preset not in PRESETS:
            raise ApiError(422, f"preset: {body.preset!r} is not one of {', '.join(PRESETS)}", "preset")
        row = {"id": "job", "image": source(body.image, "image", who), "audio": source(body.audio, "audio", who),
               **PRESETS.get(body.preset or "", {}), **body.params}
        if idempotency_key:
            found = db.batch_by_idempotency(who, idempotency_key)
            if found is not None:
                return _replay(found, row)
        jobs = _checked_job(row)
        name = "j_" + uuid.uuid4().hex[:20]
        from ..fleet.batches import binding_schema, job_row, node_schema
        from ..jobs.jobsfile import Workflow

        workflow = Workflow.load(None)
        schema = node_schema(None)
        record = {"name": name, "uri": f"{store.rstrip('/')}/{who}/jobs/{name}", "tenant": who,
                  "workflow": workflow.prompt, "workflow_name": workflow.path.name, "workflow_digest": workflow.digest,
                  "schema": binding_schema(workflow, schema, set(jobs[0].params)), "retries": 2, "backoff_s": 5.0,
                  "url_expiry_s": url_expiry_s, "idempotency_key": idempotency_key}
        from sqlalchemy.exc import IntegrityError

        try:
            batch_id, _ = db.create_batch(record, [job_row(job) for job in jobs])
        except IntegrityError:  # the same Idempotency-Key at the same moment
            found = db.batch_by_idempotency(who, idempotency_key or "")
            if found is None:
                raise
            return _replay(found, row)
        if broker_app() is not None:
            from ..fleet.queue import ring

            try:
                due = db.due(batch_id=batch_id)
                ring(broker_app(), [job_id for job_id, _ in due])
                db.rang(due)
            except Exception as exc:  # noqa: BLE001 (recorded: the workers' reconciler queues it)
                log.warning("job %s recorded, not yet queued: %s", name, exc)
        return view(db.tenant_job(who, name))

    def _replay(found: dict, row: dict):
        from fastapi.responses import JSONResponse

        job = db.tenant_job(found["tenant"], found["name"])
        if json.dumps(job["spec"].get("params"), sort_keys=True) != json.dumps(_checked_job(row)[0].params,
                                                                               sort_keys=True):
            raise ApiError(422, "this Idempotency-Key was used for another request; use a new key", "Idempotency-Key")
        return JSONResponse(view(job), status_code=200)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, who: str = Depends(tenant)):
        row = db.tenant_job(who, job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id!r}", "id")
        return view(row)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(who: str = Depends(tenant), state: str | None = None, limit: int = 50, cursor: str | None = None):
        if state is not None and state not in STATES:
            raise ApiError(422, f"state: one of {', '.join(STATES)}", "state")
        if not 1 <= limit <= 500:
            raise ApiError(422, "limit: 1 to 500", "limit")
        before = None
        if cursor:
            try:
                before = int(cursor)
            except ValueError:
                raise ApiError(422, "cursor: give the next_cursor of the previous page", "cursor") from None
        rows = db.tenant_jobs(who, state, limit + 1, before)
        page = rows[:limit]
        return {"jobs": [view(row) for row in page],
                "next_cursor": str(page[-1]["id"]) if len(rows) > limit else None}

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: str, who: str = Depends(tenant)):
        row = db.tenant_job(who, job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id!r}", "id")
        before = db.cancel(row["id"])
        if before is None:
            raise ApiError(409, f"job {job_id} is {row['state']} already: nothing to cancel", "id")
        was, server, prompt_id = before
        if was == "running" and server and prompt_id:  # its worker sees the cancel at its next heartbeat too
            from ..jobs.comfy_api import ComfyServer

            ComfyServer(server).cancel(prompt_id, 5.0)
        return view(db.tenant_job(who, job_id))

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics(who: str = Depends(tenant)):
        from prometheus_client import CollectorRegistry, Gauge, generate_latest

        registry = CollectorRegistry()
        gauge = Gauge("sonic_jobs", "jobs of this tenant by state", ["state"], registry=registry)
        counts = dict.fromkeys(STATES, 0)
        for row in db.tenant_jobs(who, None, 100_000, None):
            counts[row["state"]] += 1
        for name, count in counts.items():
            gauge.labels(state=name).set(count)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    app.state.db = db
    return app


def _iso(stamp: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp else None


def _check_public_url(url: str, field: str) -> None:
    """Refuse URLs to the service's own network (SONIC_URL_ALLOW lets an operator allow some)."""
    import socket
    import urllib.parse

    from ..inputs.urls import check_address

    host = urllib.parse.urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise ApiError(422, f"{field}: the host {host!r} does not resolve", field) from None
    for address in addresses:
        try:
            check_address(host, address)
        except PermissionError as exc:
            raise ApiError(422, f"{field}: {exc}", field) from None


def _checked_job(row: dict):
    """The request as a jobs-file row, checked exactly as `submit` checks one."""
    from ..fleet.batches import node_schema
    from ..jobs.jobsfile import JobsError, Workflow, load_jobs

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "request.jsonl"
        path.write_text(json.dumps(row) + "\n")
        try:
            return load_jobs(path, Workflow.load(None), node_schema(None))
        except JobsError as exc:
            problem = exc.problems[0].split(": ", 1)[-1]  # without "request.jsonl line 1 (id job)"
            field = None
            if problem.startswith("column "):
                word = problem.split()[1]
                name = word.strip("':")
                field = name if name in ("image", "audio") else f"params.{name}"
                problem = problem.replace(f"column {word}", f"{field}{':' if word.endswith(':') else ''}", 1)
            raise ApiError(422, problem.replace("leave the cell empty", "leave it out"), field) from None
