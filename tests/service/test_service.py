"""`python -m sonic serve` (sonic/service/) served by uvicorn on 127.0.0.1, on SQLite and on PostgreSQL, with the
embedded folder store and no executor (jobs are recorded, none runs: tests/service/test_service_live.py runs them):
keys, authentication, jobs from multipart uploads, store keys and URLs checked as `submit` checks them,
Idempotency-Key, what a tenant sees, cancel, paging and filters, presigned POST uploads, batches from jobs files,
Server-Sent Events, webhooks through the API (signed, retried, logged), signed file links, /metrics."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from servers import ROOT, PostgreSQL, log_size, wait_listening

MAX_UPLOAD = 2_000_000
NO_GPU_STACK = ("torch", "numpy", "comfy", "folder_paths", "diffusers", "transformers", "cv2", "av", "PIL", "librosa")
SERVE = ("import sys\n"  # the service runs where torch, numpy and ComfyUI cannot be imported
         f"for name in {NO_GPU_STACK!r}: sys.modules[name] = None\n"
         "from sonic.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sonic", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


class Service:
    """The service as users start it, as a subprocess; `call` speaks JSON, `http` is an httpx client."""

    def __init__(self, folder: Path, database: str, *extra: str, env: dict | None = None):
        import httpx

        self.folder, self.database = folder, database
        self.store = folder / "store"
        self.log_path = folder / "service.log"
        self.log = open(self.log_path, "a")
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "SONIC_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                    "SONIC_URL_ALLOW": "127.0.0.1", "SONIC_WEBHOOK_BACKOFF_SCALE": "0.005", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--listen", "127.0.0.1:0",
                                         "--database", database, "--store", str(self.store), *extra],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=folder)
        port = wait_listening(self.process, 0, self.log_path, log_size(self.log_path), 60, "sonic serve")
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def key(self, tenant: str) -> tuple[str, str]:
        made = cli("serve", "keys", "create", "--tenant", tenant, "--database", self.database)
        assert made.returncode == 0, made.stderr
        lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
        return lines["api_key"], lines["webhook_secret"]

    def call(self, method: str, path: str, key: str | None = None, body=None, headers=None, **kwargs):
        reply = self.http.request(method, path, json=body, headers={
            **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}, **kwargs)
        kind = reply.headers.get("content-type", "")
        return reply.status_code, (reply.json() if "json" in kind else reply.text)

    def objects(self) -> list[str]:
        return sorted(p.relative_to(self.store).as_posix() for p in self.store.rglob("*")
                      if p.is_file() and not p.relative_to(self.store).as_posix().startswith(".meta/"))

    def stop(self):
        self.http.close()
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, tmp_path_factory):
    pytest.importorskip("fastapi")
    folder = tmp_path_factory.mktemp(f"service-{request.param}")
    postgres = None
    if request.param == "sqlite":
        database = f"sqlite:///{folder / 'jobs.db'}"
    else:
        postgres = PostgreSQL(folder / "pg").start()
        database = postgres.url
    server = Service(folder, database, "--no-executor")
    try:
        yield server
    finally:
        server.stop()
        if postgres is not None:
            postgres.stop()
            postgres.close()


@pytest.fixture(scope="module")
def media(tiny_dir):
    return (tiny_dir / "inputs" / "portrait.png").read_bytes(), (tiny_dir / "inputs" / "speech.wav").read_bytes()


def job(tenant: str, **params):
    return {"image": f"inputs/{tenant}/2026/12/06/portrait.png", "audio": f"inputs/{tenant}/2026/12/06/speech.wav",
            "params": params}


def test_keys_are_shown_once_and_stored_hashed(service):
    key, secret = service.key("acme")
    again, secret_again = service.key("acme")
    assert key.startswith("sk_") and len(key) > 40 and again != key
    assert secret.startswith("whsec_") and secret_again == secret  # one signing secret per tenant
    import sqlalchemy

    engine = sqlalchemy.create_engine(service.database.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        hashes = [row[0] for row in connection.exec_driver_sql("SELECT key_hash FROM api_keys")]
    engine.dispose()
    assert hashes and key not in hashes and again not in hashes
    bad = cli("serve", "keys", "create", "--tenant", "no/slashes", "--database", service.database)
    assert bad.returncode == 2 and "--tenant" in bad.stderr and "Traceback" not in bad.stderr


def test_every_call_but_healthz_needs_a_valid_key(service):
    assert service.call("GET", "/healthz") == (200, {"ok": True})
    for key in (None, "sk_not-a-key"):
        for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/j_x"),
                             ("POST", "/v1/uploads"), ("POST", "/v1/batches"), ("GET", "/v1/webhook-deliveries"),
                             ("GET", "/metrics")):
            status, body = service.call(method, path, key)
            assert status == 401 and body["field"] == "Authorization", (method, path, body)
    status, spec = service.call("GET", "/openapi.json")
    assert status == 200 and {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                              "/v1/uploads", "/v1/batches", "/v1/batches/{batch_id}", "/v1/webhook-deliveries",
                              "/v1/events/s3", "/healthz", "/metrics"} <= set(spec["paths"])
    status, page = service.call("GET", "/docs")
    assert status == 200 and "/docs-assets/swagger-ui-bundle.js" in page  # served here: works offline
    assert service.http.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_jobs_from_keys_idempotency_and_what_a_tenant_sees(service):
    a, _ = service.key("studio-a")
    b, _ = service.key("studio-b")
    status, made = service.call("POST", "/v1/jobs", a, job("studio-a", seed=7, steps=3),
                                {"Idempotency-Key": "order-1"})
    assert status == 201 and made["state"] == "queued" and made["id"].startswith("j_") and made["output"] is None
    assert made["queue_position"] >= 1 and made["inputs"]["image"] == "inputs/studio-a/2026/12/06/portrait.png"
    status, replay = service.call("POST", "/v1/jobs", a, job("studio-a", seed=7, steps=3), {"Idempotency-Key": "order-1"})
    assert status == 200 and replay["id"] == made["id"]
    status, reused = service.call("POST", "/v1/jobs", a, job("studio-a", seed=8), {"Idempotency-Key": "order-1"})
    assert status == 422 and reused["field"] == "Idempotency-Key"
    assert service.call("GET", f"/v1/jobs/{made['id']}", a)[1]["params"] == {"seed": 7, "steps": 3}
    # another tenant: the job does not exist for it
    assert service.call("GET", f"/v1/jobs/{made['id']}", b)[0] == 404
    assert service.call("POST", f"/v1/jobs/{made['id']}/cancel", b)[0] == 404
    assert service.call("GET", f"/v1/jobs/{made['id']}/events", b)[0] == 404
    assert service.call("GET", "/v1/jobs", b)[1]["jobs"] == []
    # cancel a queued job, once
    status, cancelled = service.call("POST", f"/v1/jobs/{made['id']}/cancel", a)
    assert status == 200 and cancelled["state"] == "cancelled"
    assert service.call("POST", f"/v1/jobs/{made['id']}/cancel", a)[0] == 409


def test_a_job_from_uploaded_files(service, media):
    key, _ = service.key("uploader")
    png, wav = media
    files = {"image": ("my photo.png", png, "image/png"), "audio": ("hello.wav", wav, "audio/wav")}
    form = {"params": json.dumps({"seed": 11}), "preset": "quick"}
    status, made = service.call("POST", "/v1/jobs", key, files=files, data=form, headers={"Idempotency-Key": "u-1"})
    assert status == 201, made
    day = time.strftime("%Y/%m/%d", time.gmtime())
    image, audio = made["inputs"]["image"], made["inputs"]["audio"]
    assert image.startswith(f"inputs/uploader/{day}/") and image.endswith("-my-photo.png")
    assert audio.startswith(f"inputs/uploader/{day}/") and audio.endswith("-hello.wav")
    assert (service.store / image).read_bytes() == png and (service.store / audio).read_bytes() == wav
    assert made["params"] == {"seed": 11, "steps": 15, "min_resolution": 512}
    before = service.objects()
    status, replay = service.call("POST", "/v1/jobs", key, files=files, data=form, headers={"Idempotency-Key": "u-1"})
    assert status == 200 and replay["id"] == made["id"] and service.objects() == before
    assert len(service.call("GET", "/v1/jobs", key)[1]["jobs"]) == 1


def test_bad_uploads_leave_nothing_behind(service, media):
    key, _ = service.key("careless")
    png, wav = media
    before = service.objects()
    cases = [
        ({"image": ("a.png", wav, "image/png"), "audio": ("b.wav", wav, "audio/wav")}, {}, 422, "image",
         "not an image"),
        ({"image": ("a.png", png, "image/png"), "audio": ("b.wav", png, "audio/wav")}, {}, 422, "audio",
         "not a recording"),
        ({"image": ("a.png", png, "image/png")}, {}, 422, "audio", "file field named audio"),
        ({"image": ("a.png", png + b"\0" * MAX_UPLOAD, "image/png"), "audio": ("b.wav", wav, "audio/wav")}, {},
         413, "image", "SONIC_MAX_UPLOAD_BYTES"),
        ({"image": ("a.png", png, "image/png"), "audio": ("b.wav", wav, "audio/wav")},
         {"params": json.dumps({"steps": 0})}, 422, "params.steps", "outside 1..200"),
        ({"image": ("a.png", png, "image/png"), "audio": ("b.wav", wav, "audio/wav")},
         {"params": "{not json"}, 422, "params", "not JSON"),
        ({"image": ("a.png", png, "image/png"), "audio": ("b.wav", wav, "audio/wav")},
         {"webhook_url": "http://169.254.169.254/latest"}, 422, "webhook_url", "SONIC_URL_ALLOW"),
    ]
    for files, form, code, field, words in cases:
        status, reply = service.call("POST", "/v1/jobs", key, files=files, data=form)
        assert status == code and reply["field"] == field and words in reply["error"], (field, reply)
    assert service.objects() == before  # no object, no half-written file, no temporary file
    assert not list(service.store.rglob("*.part"))
    assert service.call("GET", "/v1/jobs", key)[1]["jobs"] == []


def test_bad_requests_name_the_field(service):
    key, _ = service.key("studio-c")
    cases = [
        (job("someone-else"), "image", "under inputs/studio-c/"),
        ({**job("studio-c"), "image": "file:///etc/passwd"}, "image", "http(s) URL or a key"),
        ({**job("studio-c"), "image": "inputs/studio-c/../someone-else/x.png"}, "image", "under inputs/studio-c/"),
        ({**job("studio-c"), "audio": "http://10.1.2.3/speech.wav"}, "audio", "SONIC_URL_ALLOW"),
        (job("studio-c", steps=0), "params.steps", "params.steps: 0 is outside 1..200"),
        (job("studio-c", no_such_input=1), "params.no_such_input", "not an input of any node"),
        ({**job("studio-c"), "preset": "fastest"}, "preset", "quick"),
        ({"audio": "inputs/studio-c/x.wav"}, "image", "Field required"),
        ({**job("studio-c"), "params": [1]}, "params", "valid dictionary"),
    ]
    for body, field, words in cases:
        status, reply = service.call("POST", "/v1/jobs", key, body)
        assert status == 422 and words in reply["error"] and reply["field"] == field, (body, reply)
    status, reply = service.call("POST", "/v1/jobs", key, {**job("studio-c"), "padding": "x" * 70_000})
    assert status == 413
    status, reply = service.call("POST", "/v1/jobs", key, content=b"image=x", headers={"Content-Type": "text/plain"})
    assert status == 415 and reply["field"] == "Content-Type"
    assert service.call("GET", "/v1/jobs", key)[1]["jobs"] == []  # nothing was recorded


def test_listing_pages_filters_and_metrics(service):
    key, _ = service.key("studio-d")
    made = [service.call("POST", "/v1/jobs", key, job("studio-d", seed=n))[1]["id"] for n in range(3)]
    status, first = service.call("GET", "/v1/jobs?limit=2", key)
    assert status == 200 and [j["id"] for j in first["jobs"]] == made[::-1][:2] and first["next_cursor"]
    status, second = service.call("GET", f"/v1/jobs?limit=2&cursor={first['next_cursor']}", key)
    assert [j["id"] for j in second["jobs"]] == made[:1] and second["next_cursor"] is None
    service.call("POST", f"/v1/jobs/{made[0]}/cancel", key)
    assert [j["id"] for j in service.call("GET", "/v1/jobs?state=cancelled", key)[1]["jobs"]] == made[:1]
    created = service.call("GET", f"/v1/jobs/{made[1]}", key)[1]["created_at"]
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    assert len(service.call("GET", f"/v1/jobs?created_after={created}", key)[1]["jobs"]) >= 2
    assert service.call("GET", f"/v1/jobs?created_after={later}", key)[1]["jobs"] == []
    assert service.call("GET", "/v1/jobs?created_after=yesterday", key)[1]["field"] == "created_after"
    status, text = service.call("GET", "/metrics", key)
    assert status == 200 and 'sonic_jobs{state="queued"} 2.0' in text and 'sonic_jobs{state="cancelled"} 1.0' in text
    assert "sonic_store_requests" in text and "sonic_webhook_deliveries" in text
    assert service.call("GET", "/v1/jobs?state=lost", key)[0] == 422


def _form_post(url: str, fields: dict, name: str, data: bytes, content_type: str):
    import httpx

    return httpx.post(url, data=fields, files={"file": (name, data, content_type)}, timeout=30)


def test_presigned_post_uploads(service, media):
    key, _ = service.key("direct")
    other, _ = service.key("direct-other")
    png, wav = media
    status, grant = service.call("POST", "/v1/uploads", key, {"filename": "face.png", "content_type": "image/png"})
    assert status == 200 and grant["key"].startswith(f"inputs/direct/{time.strftime('%Y/%m/%d', time.gmtime())}/")
    assert grant["max_bytes"] == MAX_UPLOAD and grant["url"].startswith(service.url)
    # the form as a browser sends it: no API key, the signed fields decide the key, type and size
    tampered = {**grant["fields"], "key": "inputs/direct-other/x.png"}
    assert _form_post(grant["url"], tampered, "face.png", png, "image/png").status_code == 403
    policy = json.loads(base64.b64decode(grant["fields"]["policy"]))
    forged = {**grant["fields"], "policy": base64.b64encode(json.dumps({**policy, "max_bytes": 10**10}).encode()).decode()}
    assert _form_post(grant["url"], forged, "face.png", png, "image/png").status_code == 403
    assert _form_post(grant["url"], grant["fields"], "face.png", wav, "image/png").status_code == 422
    assert not (service.store / grant["key"]).exists()
    reply = _form_post(grant["url"], grant["fields"], "face.png", png, "image/png")
    assert reply.status_code == 204 and (service.store / grant["key"]).read_bytes() == png
    status, bad = service.call("POST", "/v1/uploads", key, {"filename": "x.exe", "content_type": "application/x-msdownload"})
    assert status == 422 and bad["field"] == "content_type"
    # the uploaded key makes a job for its tenant, and for nobody else
    body = {"image": grant["key"], "audio": "inputs/direct/speech.wav"}
    assert service.call("POST", "/v1/jobs", key, body)[0] == 201
    assert service.call("POST", "/v1/jobs", other, body)[1]["field"] == "image"


def test_batches_from_jobs_files(service):
    key, _ = service.key("batcher")
    other, _ = service.key("batcher-other")
    rows = [{"id": "intro", "image": "inputs/batcher/p.png", "audio": "inputs/batcher/a.wav", "seed": 1},
            {"id": "outro", "image": "inputs/batcher/p.png", "audio": "https://93.184.215.14/b.wav", "steps": 4}]
    jsonl = "".join(json.dumps(row) + "\n" for row in rows)
    status, batch = service.call("POST", "/v1/batches?preset=quick", key, content=jsonl.encode(),
                                 headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "b-1"})
    assert status == 201 and batch["jobs"] == 2 and batch["counts"]["queued"] == 2 and batch["id"].startswith("b_")
    status, again = service.call("POST", "/v1/batches?preset=quick", key, content=jsonl.encode(),
                                 headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "b-1"})
    assert status == 200 and again["id"] == batch["id"]
    listed = service.call("GET", f"/v1/jobs?batch={batch['id']}", key)[1]["jobs"]
    assert sorted(j["id"] for j in listed) == [f"{batch['id']}~intro", f"{batch['id']}~outro"]
    outro = service.call("GET", f"/v1/jobs/{batch['id']}~outro", key)[1]
    assert outro["batch"] == batch["id"] and outro["params"] == {"steps": 4, "min_resolution": 512}
    assert service.call("GET", f"/v1/batches/{batch['id']}", other)[0] == 404
    assert service.call("GET", f"/v1/jobs/{batch['id']}~outro", other)[0] == 404
    assert service.call("GET", f"/v1/jobs/{batch['id']}", key)[0] == 404  # a batch is not a job
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "image", "audio", "seed"])
    writer.writeheader()
    writer.writerow({"id": "c1", "image": "inputs/batcher/p.png", "audio": "inputs/batcher/a.wav", "seed": 3})
    status, from_csv = service.call("POST", "/v1/batches", key, content=buffer.getvalue().encode(),
                                    headers={"Content-Type": "text/csv"})
    assert status == 201 and from_csv["jobs"] == 1
    status, view = service.call("POST", f"/v1/batches/{batch['id']}", key)
    assert status == 405
    for body, words in (([{"id": "x", "image": "inputs/batcher-other/p.png", "audio": "inputs/batcher/a.wav"}],
                         "under inputs/batcher/"),
                        ([{"id": "x", "image": "inputs/batcher/p.png", "audio": "inputs/batcher/a.wav", "steps": 0},
                          {"id": "y", "image": "inputs/batcher/p.png", "audio": "inputs/batcher/a.wav"}], "row"),
                        ([{"id": "dup", "image": "inputs/batcher/p.png", "audio": "inputs/batcher/a.wav"}] * 2,
                         "also used"), ([], "non-empty")):
        status, reply = service.call("POST", "/v1/batches", key, {"jobs": body})
        assert status == 422 and words in reply["error"], reply
    assert len(service.call("GET", "/v1/jobs", key)[1]["jobs"]) == 3


def _events(service, key: str, job_id: str, seconds: float = 30, seen: list | None = None) -> list[dict]:
    """The job's event stream until it ends -> the jobs it carried (appended to `seen` as they come)."""
    import httpx

    seen = [] if seen is None else seen
    with httpx.Client(base_url=service.url) as client, \
            client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"},
                          timeout=seconds) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    return seen


def test_events_follow_a_job_to_its_end(service):
    key, _ = service.key("watcher")
    made = service.call("POST", "/v1/jobs", key, job("watcher"))[1]
    seen: list[dict] = []
    reader = threading.Thread(target=_events, args=(service, key, made["id"], 30, seen))
    reader.start()
    deadline = time.time() + 10
    while not seen and time.time() < deadline:
        time.sleep(0.1)
    assert seen and seen[0]["state"] == "queued" and seen[0]["id"] == made["id"]
    service.call("POST", f"/v1/jobs/{made['id']}/cancel", key)
    reader.join(20)
    assert not reader.is_alive(), "the stream did not end after the job ended"
    assert seen[-1]["state"] == "cancelled" and [e["state"] for e in seen].count("cancelled") == 1
    assert _events(service, key, made["id"])[-1]["state"] == "cancelled"  # a finished job: one event, then the end


class Receiver:
    """A webhook endpoint on loopback that verifies every signature (the reference verifier, PyPI
    standardwebhooks) and answers with `answers` in turn (200 when they run out)."""

    def __init__(self, secret: str, answers: list[int]):
        from standardwebhooks.webhooks import Webhook

        self.verifier, self.answers, self.seen = Webhook(secret), list(answers), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.seen.append((headers, body, receiver.verifier.verify(body, headers)))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_are_signed_retried_and_logged(service):
    pytest.importorskip("standardwebhooks")
    key, secret = service.key("hooked")
    receiver = Receiver(secret, [500, 500])
    try:
        status, reply = service.call("PUT", "/v1/webhook", key, {"url": "http://10.0.0.7/hook"})
        assert status == 422 and reply["field"] == "webhook_url" and "SONIC_URL_ALLOW" in reply["error"]
        assert service.call("PUT", "/v1/webhook", key, {"url": receiver.url}) == (200, {"url": receiver.url})
        assert service.call("GET", "/v1/webhook", key)[1] == {"url": receiver.url}
        made = service.call("POST", "/v1/jobs", key, job("hooked"))[1]
        service.call("POST", f"/v1/jobs/{made['id']}/cancel", key)
        deadline = time.time() + 60
        while len(receiver.seen) < 3 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # nothing more comes after the 200
        assert len(receiver.seen) == 3
        ids = {headers["webhook-id"] for headers, _, _ in receiver.seen}
        bodies = {body for _, body, _ in receiver.seen}
        assert len(ids) == 1 and len(bodies) == 1  # one event, retried with the same id and bytes
        event = receiver.seen[0][2]  # what the reference verifier accepted
        assert event["type"] == "job.cancelled" and event["data"]["id"] == made["id"]
        log = service.call("GET", f"/v1/webhook-deliveries?job={made['id']}", key)[1]["deliveries"]
        assert [(d["attempt"], d["status_code"]) for d in log] == [(3, 200), (2, 500), (1, 500)]
        assert {d["msg_id"] for d in log} == ids and log[0]["event_state"] == "delivered"
        other, _ = service.key("hooked-other")
        assert service.call("GET", "/v1/webhook-deliveries", other)[1]["deliveries"] == []
    finally:
        receiver.close()


def test_file_links_are_signed(service, media):
    key, _ = service.key("linker")
    png, wav = media
    made = service.call("POST", "/v1/jobs", key, files={"image": ("p.png", png, "image/png"),
                                                        "audio": ("a.wav", wav, "audio/wav")})[1]
    # a link as the service signs its outputs' (the folder store's presign), for an input the tenant uploaded
    from sonic.jobs.storage import FolderStore

    secret = _setting(service, "link_secret")
    store = FolderStore(service.store, bytes.fromhex(secret))
    link = store.presign(f"s3://local/{made['inputs']['image']}", 60, service.url)
    reply = service.http.get(link, headers={"Range": "bytes=0-7"})
    assert reply.status_code == 206 and reply.content == png[:8] and reply.headers["content-type"] == "image/png"
    parsed = urllib.parse.urlparse(link)
    query = urllib.parse.parse_qs(parsed.query)
    other = f"{service.url}/v1/files/inputs/linker/x.png?expires={query['expires'][0]}&signature={query['signature'][0]}"
    assert service.http.get(other).status_code == 403
    expired = store.presign(f"s3://local/{made['inputs']['image']}", 1, service.url)
    time.sleep(2.1)
    assert service.http.get(expired).status_code == 403


def _setting(service, name: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(service.database.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        value = connection.execute(sqlalchemy.text("SELECT value FROM settings WHERE name = :n"), {"n": name}).scalar()
    engine.dispose()
    return value


def test_s3_events_need_the_shared_secret(service):
    status, reply = service.call("POST", "/v1/events/s3", body={"Records": []})
    assert status == 404 and "SONIC_EVENTS_SECRET" in reply["error"]
