"""The service's HTTP API (FastAPI). Every route but /healthz, the upload page and signed file links needs
`Authorization: Bearer <api key>`; a tenant sees, links and cancels only its own jobs (another tenant's job is 404,
as a job that does not exist). A job is a batch of one in the job database; a batch is many. Jobs run on the
embedded executor (no --broker: the service's own threads drive the ComfyUI servers) or on `sonic worker`s.

Errors are JSON `{"error": what was wrong and what to do, "field": the field or header}` with a 4xx status.
"""


import asyncio
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

from .jobs import AUDIO_TYPES, IMAGE_TYPES, STATES, JobService, ServiceError, iso, sniff

log = logging.getLogger("sonic.service")
MAX_BODY_BYTES = 64 * 1024  # JSON requests
MAX_BATCH_BYTES = 4 * 2**20  # a jobs file
STATIC = Path(__file__).with_name("static")
FINAL = ("done", "failed", "cancelled")


def env_bytes(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise ValueError(f"{name}={text!r}: give a number of bytes") from None


def open_store(store: str, db, s3_endpoint: str | None = None, s3_addressing: str = "auto"):
    """--store -> (the store object, its s3:// name): S3 for s3://bucket/prefix, else the embedded folder store."""
    from ..jobs.storage import S3, FolderStore

    if store.startswith("s3://"):
        return S3(s3_endpoint, s3_addressing), store.rstrip("/")
    if "://" in store:
        raise ValueError(f"--store {store!r}: give s3://bucket/prefix or a folder")
    secret = db.setting("link_secret", lambda: secrets.token_hex(32))
    folder = FolderStore(Path(store), bytes.fromhex(secret))
    return folder, folder.uri


def create_app(database: str, store: str, broker: str | None = None, url_expiry_s: int = 7200,
               s3_endpoint: str | None = None, s3_addressing: str = "auto", comfyui: list[str] | None = None,
               watch: str | None = None, executor: bool = True):
    from fastapi import Depends, FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field

    from ..jobdb.db import DatabaseUnavailable, JobDB
    from ..jobdb.tenants import Tenants
    from ..jobs.storage import FolderStore, check_url_expiry
    from . import metrics

    check_url_expiry(url_expiry_s)
    max_upload = env_bytes("SONIC_MAX_UPLOAD_BYTES", 200 * 2**20)
    events_secret = os.environ.get("SONIC_EVENTS_SECRET", "")
    db = JobDB(database, pool_size=40)  # one per FastAPI request thread (40): no reconnecting under load
    db.upgrade()
    keys = Tenants(db)
    from ..jobdb.webhooks import Webhooks

    hooks = Webhooks(db)
    the_store, store_uri = open_store(store, db, s3_endpoint, s3_addressing)
    if broker and isinstance(the_store, FolderStore):
        raise ValueError("--broker: fleet workers need a store they can reach; give --store s3://bucket/prefix")
    state = {"app": None}

    def ring(job_ids: list[int]) -> None:
        from ..fleet.queue import make_app, ring as send

        if state["app"] is None:
            state["app"] = make_app(broker)
        send(state["app"], job_ids)

    service = JobService(db, _CountingStore(the_store, metrics), store_uri, url_expiry_s, ring if broker else None)
    parts: dict = {}

    async def lifespan(_app):
        from .webhooks import Sender

        parts["sender"] = Sender(db)
        parts["sender"].start()
        if not broker and executor:
            from .embedded import Executor

            parts["executor"] = Executor(db, service.store, comfyui or ["http://127.0.0.1:8188"])
            parts["executor"].start()
        if watch:
            from .triggers import Watcher

            parts["watcher"] = Watcher(service, watch, s3_endpoint, s3_addressing)
            parts["watcher"].start()
        yield
        for name in ("watcher", "executor", "sender"):
            if name in parts:
                await asyncio.to_thread(parts[name].close if hasattr(parts[name], "close") else parts[name].stop)

    try:  # /docs from the swagger-ui-bundle package: the page works without the internet
        import swagger_ui_bundle
    except ImportError:
        swagger_ui_bundle = None
    class ErrorOut(BaseModel):
        error: str = Field(description="what was wrong and what to do")
        field: str | None = Field(None, description="the field, header or parameter it names")

    errors = {code: {"model": ErrorOut, "description": text} for code, text in (
        (401, "no valid API key"), (403, "a link or upload form whose signature is not valid or expired"),
        (404, "not found (or another tenant's)"), (409, "nothing to cancel"), (411, "Content-Length missing"),
        (413, "too large"), (415, "unsupported Content-Type"), (422, "a field is not valid"),
        (503, "the job database or the store is unreachable; try again (Retry-After)"))}
    app = FastAPI(title="Sonic Portrait", version="1", lifespan=lifespan, responses=errors,
                  docs_url=None if swagger_ui_bundle else "/docs",
                  description="Talking-head videos from a portrait and a recording (Sonic), as jobs. Authenticate "
                              "with `Authorization: Bearer <api key>` (python -m sonic serve keys create --tenant "
                              "NAME).")

    @app.exception_handler(ServiceError)
    async def api_error(_request, exc: ServiceError):
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "5"}}.get(exc.status)
        return JSONResponse({"error": exc.error, "field": exc.field}, status_code=exc.status, headers=headers)

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
            raise ServiceError(401, "give the header Authorization: Bearer <api key> (python -m sonic serve keys "
                                    "create)", "Authorization")
        name = keys.tenant_of(authorization.split(None, 1)[1].strip())
        if name is None:
            raise ServiceError(401, "this API key is not valid (unknown or revoked)", "Authorization")
        return name

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def own_job(who: str, job_id: str) -> dict:
        row = db.tenant_job(who, job_id)
        if row is None:
            raise ServiceError(404, f"no job {job_id!r}", "id")
        return row

    class JobIn(BaseModel):
        image: str = Field(description="http(s) URL, or the key of an object under inputs/<tenant>/ in the store")
        audio: str = Field(description="http(s) URL, or the key of an object under inputs/<tenant>/ in the store")
        params: dict = Field(default_factory=dict, description="workflow inputs by name, as in jobs files "
                                                               "(seed, steps, min_resolution, lip_sync_offset, ...)")
        preset: str | None = Field(None, description="quick or high_quality (params override it)")
        webhook_url: str | None = Field(None, description="where this job's job.done/failed/cancelled event goes "
                                                          "(else the tenant's webhook)")

    # -- pages and health ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    if swagger_ui_bundle is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        def docs():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Sonic Portrait API",
                                       swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/favicon.ico")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC / "icon.svg", media_type="image/svg+xml")

    @app.get("/v1/presets", tags=["jobs"])
    def list_presets(who: str = Depends(tenant)):
        """The presets a job may name (`preset`), with the workflow inputs each sets."""
        from .jobs import presets

        return {"presets": presets()}

    @app.get("/healthz", tags=["service"])
    def healthz():
        db.now()
        return {"ok": True}

    # -- jobs ------------------------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, tags=["jobs"],
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": JobIn.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["image", "audio"], "properties": {
                      "image": {"type": "string", "format": "binary"}, "audio": {"type": "string", "format": "binary"},
                      "params": {"type": "string", "description": "JSON object"}, "preset": {"type": "string"},
                      "webhook_url": {"type": "string"}}}}}, "required": True}})
    async def create_job(request: Request, who: str = Depends(tenant),
                         idempotency_key: str | None = Header(None, max_length=200)):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            row, created = await _multipart(request, who, idempotency_key)
        elif kind in ("application/json", ""):
            job = await _model(request, JobIn)

            def create():  # in a thread: the checks resolve host names, the database is synchronous
                params = service.params(job.params, job.preset)
                return service.create(who, service.source(job.image, "image", who),
                                      service.source(job.audio, "audio", who), params, service.webhook(job.webhook_url),
                                      idempotency_key)

            row, created = await asyncio.to_thread(create)
        else:
            raise ServiceError(415, "send application/json or multipart/form-data (fields image, audio, params)",
                               "Content-Type")
        return JSONResponse(service.view(row, base(request)), status_code=201 if created else 200)

    async def _read_body(request: Request, limit: int) -> bytes:
        if int(request.headers.get("content-length") or 0) > limit:
            raise ServiceError(413, f"the body is larger than {limit} bytes", None)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ServiceError(413, f"the body is larger than {limit} bytes", None)
        return bytes(data)

    async def _json_body(request: Request, limit: int):
        data = await _read_body(request, limit)
        try:
            value = json.loads(data or b"{}")
            json.dumps(value, ensure_ascii=False).encode()  # lone surrogates ("\ud800") are valid JSON, not text
        except (ValueError, UnicodeError, RecursionError):
            raise ServiceError(422, "the body is not JSON text (UTF-8, nested at most a few hundred levels)",
                               "body") from None
        return value

    async def _model(request: Request, model):
        """The JSON body as `model`, read after the API key was checked (a Depends that runs first)."""
        from pydantic import ValidationError

        try:
            return model.model_validate(await _json_body(request, MAX_BODY_BYTES))
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {}
            field = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ServiceError(422, f"{field or 'body'}: {first.get('msg', 'invalid')}", field) from None

    async def _multipart(request: Request, who: str, idempotency_key: str | None):
        length = request.headers.get("content-length")
        if length is None:
            raise ServiceError(411, "send a Content-Length with multipart uploads", "Content-Length")
        if int(length) > 2 * max_upload + MAX_BODY_BYTES:
            raise ServiceError(413, f"the upload is larger than the service takes ({max_upload} bytes a file; "
                                    "SONIC_MAX_UPLOAD_BYTES)", None)
        try:
            form = await request.form(max_files=2, max_fields=8, max_part_size=MAX_BODY_BYTES)
        except Exception as exc:  # noqa: BLE001 (starlette's MultiPartException and parser errors)
            raise ServiceError(422, f"the multipart body could not be read: {exc}", "body") from None
        try:
            try:
                params = json.loads(form.get("params") or "{}")
            except (ValueError, TypeError):
                raise ServiceError(422, "params: not JSON; give a JSON object, e.g. {\"seed\": 7}", "params") from None
            params = service.params(params, form.get("preset") or None)
            hook = form.get("webhook_url") or None
            files = {}
            for field, types in (("image", IMAGE_TYPES), ("audio", AUDIO_TYPES)):
                upload = form.get(field)
                if upload is None or isinstance(upload, str):
                    raise ServiceError(422, f"{field}: attach the {'photo' if field == 'image' else 'recording'} "
                                            f"as a file field named {field}", field)
                data = await upload.read(max_upload + 1)
                if len(data) > max_upload:
                    raise ServiceError(413, f"{field}: larger than {max_upload} bytes (SONIC_MAX_UPLOAD_BYTES)", field)
                content_type = sniff(data, field)
                if content_type is None:
                    raise ServiceError(422, f"{field}: not a{'n image (PNG, JPEG, WebP)' if field == 'image' else ' recording (WAV, MP3, FLAC, OGG, M4A)'}"
                                            f"; {upload.filename or 'the file'} starts with {data[:8]!r}", field)
                files[field] = (data, content_type, upload.filename or field, types[content_type])
        finally:
            await form.close()
        return await asyncio.to_thread(_store_and_create, who, files, params, hook, idempotency_key)

    def _store_and_create(who, files, params, hook, idempotency_key):
        hook = service.webhook(hook)  # resolves its host: here, in a thread
        uris, made = {}, []
        try:
            for field, (data, content_type, filename, suffix) in files.items():
                digest = hashlib.sha256(data).hexdigest()
                uri = service.uri(service.upload_key(who, filename, suffix, digest))
                if service.store.head(uri) is None:
                    with tempfile.NamedTemporaryFile(prefix="sonic-upload-", suffix=suffix, delete=False) as temp:
                        temp.write(data)
                    try:
                        service.store.upload(Path(temp.name), uri, {"sha256": digest, "sonic-tenant": who},
                                             content_type)
                    finally:
                        os.unlink(temp.name)
                    made.append(uri)
                uris[field] = uri
        except ServiceError:
            service._remove(made)
            raise
        except Exception as exc:
            service._remove(made)
            log.warning("upload to the store failed: %s", exc)
            raise ServiceError(503, "the store did not take the upload; try again shortly", None) from None
        return service.create(who, uris["image"], uris["audio"], params, hook, idempotency_key, cleanup=made)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(request: Request, job_id: str, who: str = Depends(tenant)):
        return service.view(own_job(who, job_id), base(request))

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(request: Request, who: str = Depends(tenant), state: str | None = None, batch: str | None = None,
                  created_after: str | None = None, created_before: str | None = None, limit: int = 50,
                  cursor: str | None = None):
        if state is not None and state not in STATES:
            raise ServiceError(422, f"state: one of {', '.join(STATES)}", "state")
        if not 1 <= limit <= 500:
            raise ServiceError(422, "limit: 1 to 500", "limit")
        before = _cursor(cursor)
        since, until = _when(created_after, "created_after"), _when(created_before, "created_before")
        rows = db.tenant_jobs(who, state, limit + 1, before, batch, since, until)
        page = rows[:limit]
        return {"jobs": [service.view(row, base(request)) for row in page],
                "next_cursor": str(page[-1]["id"]) if len(rows) > limit else None}

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(request: Request, job_id: str, who: str = Depends(tenant)):
        row = own_job(who, job_id)
        before = db.cancel(row["id"])
        if before is None:
            raise ServiceError(409, f"job {job_id} is {row['state']} already: nothing to cancel", "id")
        was, server, prompt_id = before
        if was == "running" and server and prompt_id:  # its worker sees the cancel at its next heartbeat too
            from ..jobs.comfy_api import ComfyServer

            ComfyServer(server).cancel(prompt_id, 5.0)
        return service.view(own_job(who, job_id), base(request))

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "`event: job` with the job "
                              "as data whenever it changes; ends after done, failed or cancelled"}})
    async def job_events(request: Request, job_id: str, who: str = Depends(tenant)):
        await asyncio.to_thread(own_job, who, job_id)
        link_base = base(request)

        async def stream():
            last, sent_at, number = None, time.monotonic(), 0
            while True:
                if await request.is_disconnected():
                    return
                row = await asyncio.to_thread(db.tenant_job, who, job_id)
                view = service.view(row, link_base)
                text = json.dumps(view, sort_keys=True)
                comparable = json.dumps({**view, "output": view["output"] and {**view["output"], "url": None,
                                                                               "expires_at": None}}, sort_keys=True)
                if comparable != last:
                    number += 1
                    last, sent_at = comparable, time.monotonic()
                    yield f"id: {number}\nevent: job\ndata: {text}\n\n"
                    if view["state"] in FINAL:
                        return
                elif time.monotonic() - sent_at > 15:
                    sent_at = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- uploads straight to the store ------------------------------------------------------------------------
    class UploadIn(BaseModel):
        filename: str = Field(max_length=200, description="the file's name (its extension is kept)")
        content_type: str = Field(description="image/png, image/jpeg, image/webp, audio/wav, audio/mpeg, "
                                              "audio/flac, audio/ogg or audio/mp4")

    @app.post("/v1/uploads", tags=["uploads"], openapi_extra=_body_schema(UploadIn))
    async def create_upload(request: Request, who: str = Depends(tenant)):
        body = await _model(request, UploadIn)
        return await asyncio.to_thread(_grant_upload, request, body, who)

    def _grant_upload(request: Request, body, who: str) -> dict:
        types = {**IMAGE_TYPES, **AUDIO_TYPES}
        if body.content_type not in types:
            raise ServiceError(422, f"content_type: one of {', '.join(types)}", "content_type")
        key = service.upload_key(who, body.filename, types[body.content_type])
        expiry = 900
        if isinstance(the_store, FolderStore):
            policy = {"key": key, "content_type": body.content_type, "max_bytes": max_upload,
                      "expires": int(time.time()) + expiry}
            fields = the_store.sign_post(policy)
            url = base(request) + "/v1/uploads/direct"
        else:
            bucket, object_key = _split(service.uri(key))
            reply = the_store.client.generate_presigned_post(
                bucket, object_key, Fields={"Content-Type": body.content_type},
                Conditions=[{"Content-Type": body.content_type}, ["content-length-range", 1, max_upload]],
                ExpiresIn=expiry)
            url, fields = reply["url"], reply["fields"]
            metrics.STORE_REQUESTS.labels("presign", "ok").inc()
        return {"url": url, "fields": fields, "key": key, "max_bytes": max_upload,
                "expires_at": iso(time.time() + expiry)}

    @app.post("/v1/uploads/direct", tags=["uploads"], include_in_schema=False)
    async def direct_upload(request: Request):
        """The folder store's answer to a presigned POST (S3's browser upload form): the form's fields and its
        signature decide the key, type and size; no API key."""
        if not isinstance(the_store, FolderStore):
            raise ServiceError(404, "uploads go straight to the object store here", None)
        length = int(request.headers.get("content-length") or 0)
        if not length or length > max_upload + MAX_BODY_BYTES:
            raise ServiceError(413, f"the upload is larger than {max_upload} bytes", "file")
        form = await request.form(max_files=1, max_fields=8, max_part_size=MAX_BODY_BYTES)
        try:
            policy = the_store.check_post({k: v for k, v in form.items() if isinstance(v, str)})
            if policy is None:
                raise ServiceError(403, "the upload form's signature is not valid or it expired; ask POST /v1/uploads "
                                        "for a new one", "signature")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ServiceError(422, "file: attach the file as the form's last field, named file", "file")
            data = await upload.read(policy["max_bytes"] + 1)
            if not 1 <= len(data) <= policy["max_bytes"]:
                raise ServiceError(413, f"file: 1 to {policy['max_bytes']} bytes", "file")
            kind = "image" if policy["content_type"].startswith("image/") else "audio"
            if sniff(data, kind) != policy["content_type"]:
                raise ServiceError(422, f"file: not {policy['content_type']}", "file")
        finally:
            await form.close()

        def put():
            with tempfile.NamedTemporaryFile(prefix="sonic-upload-", delete=False) as temp:
                temp.write(data)
            try:
                service.store.upload(Path(temp.name), service.uri(policy["key"]),
                                     {"sha256": hashlib.sha256(data).hexdigest()}, policy["content_type"])
            finally:
                os.unlink(temp.name)

        await asyncio.to_thread(put)
        return Response(status_code=204)

    # -- batches ---------------------------------------------------------------------------------------------
    @app.post("/v1/batches", status_code=201, tags=["batches"],
              openapi_extra={"requestBody": {"content": {
                  "application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}},
                  "application/json": {"schema": {"type": "object", "required": ["jobs"], "properties": {
                      "jobs": {"type": "array", "items": {"type": "object"}}, "preset": {"type": "string"},
                      "webhook_url": {"type": "string"}}}}}, "required": True}})
    async def create_batch(request: Request, who: str = Depends(tenant),
                           idempotency_key: str | None = Header(None, max_length=200)):
        from ..jobs.jobsfile import JobsError, read_rows

        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        preset, hook = request.query_params.get("preset"), request.query_params.get("webhook_url")
        if kind == "application/json":
            body = await _json_body(request, MAX_BATCH_BYTES)
            if not isinstance(body, dict) or not isinstance(body.get("jobs"), list) or not body["jobs"]:
                raise ServiceError(422, "jobs: give a non-empty list of jobs ({\"id\", \"image\", \"audio\", "
                                        "...params})", "jobs")
            raw = body["jobs"]
            preset, hook = body.get("preset", preset), body.get("webhook_url", hook)
        elif kind in ("application/x-ndjson", "application/jsonl", "text/csv"):
            text = (await _read_body(request, MAX_BATCH_BYTES)).decode("utf-8", "replace")
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / ("jobs.csv" if kind == "text/csv" else "jobs.jsonl")
                path.write_text(text)
                try:
                    raw = [row for _, row in read_rows(path)]
                except JobsError as exc:
                    raise ServiceError(422, exc.problems[0].replace("jobs.jsonl", "jobs"), "jobs") from None
                except ValueError as exc:
                    raise ServiceError(422, str(exc).replace(str(path), "the jobs"), "jobs") from None
        else:
            raise ServiceError(415, "send a jobs file as application/x-ndjson (JSON lines) or text/csv, or "
                                    "application/json {\"jobs\": [...]}", "Content-Type")
        try:
            json.dumps(raw, ensure_ascii=False).encode()
        except UnicodeError:
            raise ServiceError(422, "jobs: text with a lone surrogate (\\ud800...) is not text", "jobs") from None
        if len(raw) > 10_000:
            raise ServiceError(413, "at most 10000 jobs in one batch", "jobs")

        def create():  # in a thread: the checks resolve host names, the database is synchronous
            rows = []
            for number, item in enumerate(raw, 1):
                if not isinstance(item, dict):
                    raise ServiceError(422, f"jobs row {number}: a job is an object with id, image, audio", "jobs")
                params = service.params({k: v for k, v in item.items() if k not in ("id", "image", "audio")}, preset)
                rows.append({"id": item.get("id", number), "image": service.source(item.get("image"), "image", who),
                             "audio": service.source(item.get("audio"), "audio", who), **params})
            return service.create_batch(who, rows, service.webhook(hook), idempotency_key)

        batch, created = await asyncio.to_thread(create)
        return JSONResponse(_batch_view(batch), status_code=201 if created else 200)

    def _batch_view(batch: dict) -> dict:
        counts = db.counts(batch["id"])
        done = sum(counts[s] for s in FINAL)
        total = sum(counts.values())
        return {"id": batch["name"], "state": "done" if done == total else "running" if counts["running"] or done
                else "queued", "counts": counts, "jobs": total, "created_at": iso(batch["created_at"]),
                "failed_jobs": db.failed(batch["id"], 50), "jobs_url": f"/v1/jobs?batch={batch['name']}"}

    @app.get("/v1/batches/{batch_id}", tags=["batches"])
    def get_batch(batch_id: str, who: str = Depends(tenant)):
        batch = db.tenant_batch(who, batch_id)
        if batch is None or batch_id.startswith("j_"):
            raise ServiceError(404, f"no batch {batch_id!r}", "id")
        return _batch_view(batch)

    # -- webhooks --------------------------------------------------------------------------------------------
    class WebhookIn(BaseModel):
        url: str | None = Field(None, description="where job.done/failed/cancelled events go; null to stop")

    @app.put("/v1/webhook", tags=["webhooks"], openapi_extra=_body_schema(WebhookIn))
    async def set_webhook(request: Request, who: str = Depends(tenant)):
        body = await _model(request, WebhookIn)
        url = await asyncio.to_thread(service.webhook, body.url)
        await asyncio.to_thread(hooks.set_tenant_webhook, who, url)
        return {"url": url}

    @app.get("/v1/webhook", tags=["webhooks"])
    def get_webhook(who: str = Depends(tenant)):
        return {"url": hooks.tenant_webhook(who)}

    @app.get("/v1/webhook-deliveries", tags=["webhooks"])
    def webhook_deliveries(who: str = Depends(tenant), limit: int = 50, cursor: str | None = None,
                           job: str | None = None, type: str | None = None):
        if not 1 <= limit <= 500:
            raise ServiceError(422, "limit: 1 to 500", "limit")
        before = _cursor(cursor)
        rows = hooks.deliveries(who, limit + 1, before, type, job)
        page = rows[:limit]
        return {"deliveries": [_delivery(row) for row in page],
                "next_cursor": str(page[-1]["id"]) if len(rows) > limit else None}

    def _delivery(row: dict) -> dict:
        return {key: (iso(value) if key == "at" else value) for key, value in row.items()}

    # -- start on upload -------------------------------------------------------------------------------------
    @app.post("/v1/events/s3", tags=["triggers"])
    async def s3_events(request: Request):
        """S3 / MinIO event notifications (shared secret: `Authorization: Bearer $SONIC_EVENTS_SECRET`)."""
        given = request.headers.get("authorization", "")
        if not events_secret:
            raise ServiceError(404, "S3 events are not enabled here (set SONIC_EVENTS_SECRET)", None)
        if not secrets.compare_digest(given.encode(), f"Bearer {events_secret}".encode()):
            raise ServiceError(401, "give Authorization: Bearer <SONIC_EVENTS_SECRET>", "Authorization")
        body = await _json_body(request, MAX_BATCH_BYTES)
        from .triggers import handle_event

        return await asyncio.to_thread(handle_event, service, body)

    # -- links to the folder store's objects -----------------------------------------------------------------
    @app.get("/v1/files/{key:path}", tags=["files"], include_in_schema=False)
    def file_link(key: str, expires: int = 0, signature: str = ""):
        if not isinstance(the_store, FolderStore) or not the_store.link_ok(key, expires, signature):
            raise ServiceError(403, "this link is not valid or it expired; GET the job again for a fresh link",
                               "signature")
        uri = service.uri(key)
        head = the_store.head(uri)
        if head is None:
            raise ServiceError(404, "no such object", "key")
        metrics.STORE_REQUESTS.labels("get", "ok").inc()
        return FileResponse(the_store.path(uri), media_type=head["content_type"], filename=_download_name(key),
                            content_disposition_type="inline")

    # -- metrics ---------------------------------------------------------------------------------------------
    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def prometheus(who: str = Depends(tenant)):
        from prometheus_client import CollectorRegistry, Gauge, generate_latest

        from prometheus_client import Histogram

        registry = CollectorRegistry()
        gauge = Gauge("sonic_jobs", "jobs of this tenant by state", ["state"], registry=registry)
        for name, count in db.tenant_counts(who).items():
            gauge.labels(state=name).set(count)
        run = Histogram("sonic_job_run_seconds", "this tenant's finished jobs: from the last start to the end",
                        buckets=metrics.SECONDS, registry=registry)
        wait = Histogram("sonic_job_queue_wait_seconds", "this tenant's started jobs: from creation to the last "
                         "start", buckets=metrics.SECONDS, registry=registry)
        for created, started, finished in db.tenant_times(who, 10_000):
            if started is not None:
                wait.observe(max(started - created, 0.0))
                if finished is not None:
                    run.observe(max(finished - started, 0.0))
        text = generate_latest(registry) + generate_latest(metrics.REGISTRY)
        return PlainTextResponse(text.decode(), media_type="text/plain; version=0.0.4")

    app.state.db = db
    app.state.service = service
    return app


def _body_schema(model) -> dict:
    """OpenAPI for a JSON body that the route reads itself (after the API key is checked)."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}}


def _cursor(text: str | None) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise ServiceError(422, "cursor: give the next_cursor of the previous page", "cursor")
    return value


def _download_name(key: str) -> str:
    """The name a browser saves a link as: an output's job id (<tenant>/jobs/<batch>/<job>.mp4), else the key's."""
    from ..jobdb.db import public_job_id

    parts = key.split("/")
    if len(parts) == 4 and parts[1] == "jobs" and parts[3].endswith(".mp4"):
        return public_job_id(parts[2], parts[3][:-4]) + ".mp4"
    return parts[-1]


def _when(text: str | None, field: str) -> float | None:
    if not text:
        return None
    import datetime

    try:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ServiceError(422, f"{field}: give an ISO 8601 time, e.g. 2026-12-06T08:00:00Z", field) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


def _split(uri: str) -> tuple[str, str]:
    from ..jobs.storage import split_s3

    return split_s3(uri)


class _CountingStore:
    """The store, with every request counted in the service's metrics (sonic_store_requests)."""

    OPERATIONS = {"upload": "put", "write": "put", "download": "get", "read": "get", "head": "head", "copy": "copy",
                  "delete": "delete", "presign": "presign"}

    def __init__(self, store, metrics):
        self._store, self._metrics = store, metrics

    def __getattr__(self, name):
        value = getattr(self._store, name)
        operation = self.OPERATIONS.get(name)
        if operation is None or not callable(value):
            return value

        def counted(*args, **kwargs):
            try:
                result = value(*args, **kwargs)
            except FileNotFoundError:
                self._metrics.STORE_REQUESTS.labels(operation, "ok").inc()
                raise
            except Exception:
                self._metrics.STORE_REQUESTS.labels(operation, "error").inc()
                raise
            self._metrics.STORE_REQUESTS.labels(operation, "ok").inc()
            return result

        return counted
