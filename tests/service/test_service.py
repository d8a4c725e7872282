"""`python -m sonic serve` (sonic/service/) served by uvicorn on 127.0.0.1, on a SQLite job database: keys,
authentication, jobs from store keys and URLs checked as `submit` checks them, Idempotency-Key, a tenant's view,
cancel, paging, /healthz, /metrics, /openapi.json. Jobs running to the end on the fleet: tests/fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from servers import ROOT, log_size, wait_listening

STORE = "s3://studio/renders"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sonic", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


class Service:
    def __init__(self, folder):
        self.database = f"sqlite:///{folder / 'jobs.db'}"
        log_path = folder / "service.log"
        self.log = open(log_path, "a")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
               "AWS_DEFAULT_REGION": "us-east-1"}
        self.process = subprocess.Popen([sys.executable, "-m", "sonic", "serve", "--listen", "127.0.0.1:0",
                                         "--database", self.database, "--store", STORE],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=folder)
        port = wait_listening(self.process, 0, log_path, log_size(log_path) * 0, 60, "sonic serve")
        self.url = f"http://127.0.0.1:{port}"

    def key(self, tenant: str) -> tuple[str, str]:
        made = cli("serve", "keys", "create", "--tenant", tenant, "--database", self.database)
        assert made.returncode == 0, made.stderr
        lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
        return lines["api_key"], lines["webhook_secret"]

    def call(self, method: str, path: str, key: str | None = None, body=None, headers=None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={**({"Authorization": f"Bearer {key}"} if key else {}),
                                                  **({"Content-Type": "application/json"} if body is not None else {}),
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                return response.status, (json.loads(text) if "json" in response.headers.get("Content-Type", "") else text)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def stop(self):
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("fastapi")
    server = Service(tmp_path_factory.mktemp("service"))
    try:
        yield server
    finally:
        server.stop()


def job(tenant: str, **params):
    return {"image": f"inputs/{tenant}/2026/12/06/portrait.png", "audio": f"inputs/{tenant}/2026/12/06/speech.wav",
            "params": params}


def test_keys_are_shown_once_and_stored_hashed(service):
    key, secret = service.key("acme")
    again, secret_again = service.key("acme")
    assert key.startswith("sk_") and len(key) > 40 and again != key
    assert secret.startswith("whsec_") and secret_again == secret  # one signing secret per tenant
    import sqlite3

    dump = "\n".join(sqlite3.connect(service.database.removeprefix("sqlite:///")).iterdump())
    assert key not in dump and again not in dump
    bad = cli("serve", "keys", "create", "--tenant", "no/slashes", "--database", service.database)
    assert bad.returncode == 2 and "--tenant" in bad.stderr and "Traceback" not in bad.stderr


def test_every_call_but_healthz_needs_a_valid_key(service):
    assert service.call("GET", "/healthz") == (200, {"ok": True})
    for key in (None, "sk_not-a-key"):
        status, body = service.call("GET", "/v1/jobs", key)
        assert status == 401 and body["field"] == "Authorization", body
    status, body = service.call("GET", "/metrics")
    assert status == 401
    status, spec = service.call("GET", "/openapi.json")
    assert status == 200 and {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel"} <= set(spec["paths"])


def test_jobs_idempotency_and_what_a_tenant_sees(service):
    a, _ = service.key("studio-a")
    b, _ = service.key("studio-b")
    status, made = service.call("POST", "/v1/jobs", a, job("studio-a", seed=7, steps=3),
                                {"Idempotency-Key": "order-1"})
    assert status == 201 and made["state"] == "queued" and made["id"].startswith("j_") and made["output"] is None
    status, replay = service.call("POST", "/v1/jobs", a, job("studio-a", seed=7, steps=3), {"Idempotency-Key": "order-1"})
    assert status == 200 and replay["id"] == made["id"]
    status, reused = service.call("POST", "/v1/jobs", a, job("studio-a", seed=8), {"Idempotency-Key": "order-1"})
    assert status == 422 and reused["field"] == "Idempotency-Key"
    assert service.call("GET", f"/v1/jobs/{made['id']}", a)[1]["state"] == "queued"
    # another tenant: the job does not exist for it
    assert service.call("GET", f"/v1/jobs/{made['id']}", b)[0] == 404
    assert service.call("POST", f"/v1/jobs/{made['id']}/cancel", b)[0] == 404
    assert service.call("GET", "/v1/jobs", b)[1]["jobs"] == []
    import sqlite3

    connection = sqlite3.connect(service.database.removeprefix("sqlite:///"))
    (uri, spec), = connection.execute("select b.uri, j.spec from jobs j join batches b on b.id = j.batch_id "
                                      f"where b.name = '{made['id']}'").fetchall()
    spec = json.loads(spec)
    assert uri == f"{STORE}/studio-a/jobs/{made['id']}"  # outputs under the tenant's own prefix
    assert spec["image"]["location"] == f"{STORE}/inputs/studio-a/2026/12/06/portrait.png"
    assert spec["params"] == {"seed": 7, "steps": 3}
    # cancel a queued job, once
    status, cancelled = service.call("POST", f"/v1/jobs/{made['id']}/cancel", a)
    assert status == 200 and cancelled["state"] == "cancelled"
    assert service.call("POST", f"/v1/jobs/{made['id']}/cancel", a)[0] == 409


def test_bad_requests_name_the_field(service):
    key, _ = service.key("studio-c")
    cases = [
        (job("someone-else"), "image", "under inputs/studio-c/"),
        ({**job("studio-c"), "image": "file:///etc/passwd"}, "image", "http(s) URL or a key"),
        ({**job("studio-c"), "audio": "http://127.0.0.1:9/speech.wav"}, "audio", "SONIC_URL_ALLOW"),
        (job("studio-c", steps=0), "params.steps", "params.steps: 0 is outside 1..200"),
        (job("studio-c", no_such_input=1), "params.no_such_input", "not an input of any node"),
        ({**job("studio-c"), "preset": "fastest"}, "preset", "quick"),
        ({"audio": "inputs/studio-c/x.wav"}, "image", "Field required"),
    ]
    for body, field, words in cases:
        status, reply = service.call("POST", "/v1/jobs", key, body)
        assert status == 422 and words in reply["error"], (body, reply)
        if field:
            assert reply["field"] == field, (body, reply)
    assert service.call("GET", "/v1/jobs", key)[1]["jobs"] == []  # nothing was recorded


def test_listing_pages_and_metrics(service):
    key, _ = service.key("studio-d")
    made = [service.call("POST", "/v1/jobs", key, job("studio-d", seed=n))[1]["id"] for n in range(3)]
    status, first = service.call("GET", "/v1/jobs?limit=2", key)
    assert status == 200 and [j["id"] for j in first["jobs"]] == made[::-1][:2] and first["next_cursor"]
    status, second = service.call("GET", f"/v1/jobs?limit=2&cursor={first['next_cursor']}", key)
    assert [j["id"] for j in second["jobs"]] == made[:1] and second["next_cursor"] is None
    service.call("POST", f"/v1/jobs/{made[0]}/cancel", key)
    assert [j["id"] for j in service.call("GET", "/v1/jobs?state=cancelled", key)[1]["jobs"]] == made[:1]
    status, text = service.call("GET", "/metrics", key)
    assert status == 200 and 'sonic_jobs{state="queued"} 2.0' in text and 'sonic_jobs{state="cancelled"} 1.0' in text
    assert service.call("GET", "/v1/jobs?state=lost", key)[0] == 422
