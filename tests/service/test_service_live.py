"""The service in embedded mode running real jobs: `python -m sonic serve` with its executor driving a real ComfyUI
0.8.0 (--cpu, tiny models), rclone's S3 server as the store (it checks signatures), SQLite as the job database.
A job from uploaded files runs to the end, its signed job.done webhook arrives and its link gives the stored bytes;
a running job is cancelled and leaves ComfyUI's queue; /metrics moves as jobs run and while the store is down;
uploads under --watch and S3 event notifications each start exactly one job, also after a restart."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request

import pytest
from servers import NEWEST, ComfyUI, S3Server, comfyui_dir
from test_service import Receiver, Service

FAST = {"steps": 2, "min_resolution": 128, "duration": 1.0}
PRESETS = json.dumps({"quick": FAST})
STORE = "s3://studio/svc"
LEASE_S = 6


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_dir):
    pytest.importorskip("fastapi")
    comfyui_dir(NEWEST)
    top = tmp_path_factory.mktemp("live")
    comfy = s3 = service = None
    try:
        comfy = ComfyUI(top / "comfyui", tiny_dir, threads=2, version=NEWEST).start()  # the page test: 0.8.0
        s3 = S3Server(top / "s3", ("studio",))
        comfy.wait()
        env = {**s3.env, "SONIC_PRESETS": PRESETS, "SONIC_LEASE_SECONDS": str(LEASE_S),
               "SONIC_RECONCILE_INTERVAL": "2"}
        service = Service(top, f"sqlite:///{top / 'jobs.db'}", "--store", STORE, "--comfyui", comfy.url, env=env)
        service.comfy, service.s3 = comfy, s3
        yield service
    finally:
        for part in (service, comfy, s3):
            if part is not None:
                part.stop()


def metric(text: str, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def wait_state(service, key: str, job_id: str, states: tuple[str, ...], seconds: float = 240) -> dict:
    deadline = time.time() + seconds
    while (job := service.call("GET", f"/v1/jobs/{job_id}", key)[1])["state"] not in states:
        assert time.time() < deadline, (job, service.log_path.read_text()[-3000:])
        time.sleep(0.3)
    return job


def job_from_keys(service, tiny_dir, tenant: str, **params) -> tuple[str, dict]:
    """A new tenant's key and a job made from the tiny inputs uploaded under its inputs/ -> (key, the job)."""
    key, _ = service.key(tenant)
    for name in ("portrait.png", "speech.wav"):
        service.s3.client().upload_file(str(tiny_dir / "inputs" / name), "studio", f"svc/inputs/{tenant}/{name}")
    made = service.call("POST", "/v1/jobs", key, {"image": f"inputs/{tenant}/portrait.png",
                                                  "audio": f"inputs/{tenant}/speech.wav",
                                                  "params": {**FAST, **params}})[1]
    return key, made


def wait_comfyui(service, until, job_id: str, key: str, seconds: float = 120) -> None:
    """Until `until(prompts running on the ComfyUI)` holds."""
    deadline = time.time() + seconds
    while not until(json.loads(urllib.request.urlopen(service.comfy.url + "/queue", timeout=10).read())[
            "queue_running"]):
        assert time.time() < deadline, service.call("GET", f"/v1/jobs/{job_id}", key)
        time.sleep(0.2)


def test_a_job_from_uploaded_files_runs_and_its_link_gives_the_stored_bytes(live, tiny_dir):
    pytest.importorskip("standardwebhooks")
    key, secret = live.key("acme")
    receiver = Receiver(secret, [])
    try:
        png = (tiny_dir / "inputs" / "portrait.png").read_bytes()
        wav = (tiny_dir / "inputs" / "speech.wav").read_bytes()
        before = live.call("GET", "/metrics", key)[1]
        status, made = live.call("POST", "/v1/jobs", key, files={"image": ("portrait.png", png, "image/png"),
                                                                  "audio": ("speech.wav", wav, "audio/wav")},
                                 data={"preset": "quick", "params": json.dumps({"seed": 5}),
                                       "webhook_url": receiver.url})
        assert status == 201, made
        running = wait_state(live, key, made["id"], ("running", "done", "failed"))
        job = wait_state(live, key, made["id"], ("done", "failed"))
        assert job["state"] == "done", job
        assert job["progress"] == {"value": 2, "max": 2}  # denoising steps, not the decoded frames after them
        assert running["state"] != "running" or running["queue_position"] is None
        assert job["timings"] and job["attempts"] == 1 and job["output"]["expires_at"]
        link = job["output"]["url"]
        assert "X-Amz-Signature=" in link and link.startswith(live.s3.endpoint)
        data = urllib.request.urlopen(link, timeout=30).read()
        stored = live.s3.client().get_object(Bucket="studio", Key=f"svc/acme/jobs/{made['id']}/job.mp4")
        body = stored["Body"].read()
        assert data == body and stored["ContentType"] == "video/mp4"
        assert hashlib.sha256(data).hexdigest() == job["output"]["sha256"] and len(data) == job["output"]["bytes"]
        inputs = [item["Key"] for item in live.s3.client().list_objects_v2(
            Bucket="studio", Prefix="svc/inputs/acme/")["Contents"]]
        assert sorted(inputs) == sorted(f"svc/{job['inputs'][k]}" for k in ("image", "audio"))
        # the job.done event, signed (the reference verifier accepted it), once
        deadline = time.time() + 30
        while not receiver.seen and time.time() < deadline:
            time.sleep(0.2)
        (headers, _, event), = receiver.seen
        assert event["type"] == "job.done" and event["data"]["id"] == made["id"]
        assert event["data"]["output"] == {"sha256": job["output"]["sha256"], "bytes": job["output"]["bytes"]}
        while not live.call("GET", f"/v1/webhook-deliveries?job={made['id']}", key)[1]["deliveries"]:
            assert time.time() < deadline  # the sender records the delivery after the receiver answered
            time.sleep(0.1)
        after = live.call("GET", "/metrics", key)[1]
        assert metric(after, "sonic_jobs", state="done") == metric(before, "sonic_jobs", state="done") + 1
        assert metric(after, "sonic_store_requests_total", operation="put", outcome="ok") >= \
            metric(before, "sonic_store_requests_total", operation="put", outcome="ok") + 3  # 2 inputs, the MP4
        assert metric(after, "sonic_webhook_deliveries_total", outcome="delivered") >= 1
        assert metric(after, "sonic_job_run_seconds_count") == metric(before, "sonic_job_run_seconds_count") + 1
        assert metric(after, "sonic_job_run_seconds_sum") > metric(before, "sonic_job_run_seconds_sum")
        assert metric(after, "sonic_job_queue_wait_seconds_count") >= 1
    finally:
        receiver.close()


def test_a_running_job_is_cancelled_and_leaves_comfyuis_queue(live, tiny_dir):
    key, made = job_from_keys(live, tiny_dir, "canceller", steps=40)
    client = live.s3.client()
    wait_comfyui(live, lambda running: running, made["id"], key)
    status, cancelled = live.call("POST", f"/v1/jobs/{made['id']}/cancel", key)
    assert status == 200 and cancelled["state"] == "cancelled"
    wait_comfyui(live, lambda running: not running, made["id"], key, 30)
    time.sleep(LEASE_S / 2)  # the executor's next heartbeat has seen the cancel: nothing is stored later
    assert live.call("GET", f"/v1/jobs/{made['id']}", key)[1]["state"] == "cancelled"
    listed = client.list_objects_v2(Bucket="studio", Prefix=f"svc/canceller/jobs/{made['id']}/")
    assert listed.get("KeyCount", 0) == 0


def test_metrics_count_store_failures_and_nothing_is_half_stored(live, tiny_dir):
    key, _ = live.key("outage")
    png = (tiny_dir / "inputs" / "portrait.png").read_bytes()
    wav = (tiny_dir / "inputs" / "speech.wav").read_bytes()
    files = {"image": ("portrait.png", png, "image/png"), "audio": ("speech.wav", wav, "audio/wav")}
    before = live.call("GET", "/metrics", key)[1]
    live.s3.stop()
    try:
        reply = live.http.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"}, files=files,
                               data={"preset": "quick"})
        assert reply.status_code == 503 and "store" in reply.json()["error"] and reply.headers["retry-after"] == "5"
        during = live.call("GET", "/metrics", key)[1]
    finally:
        live.s3.start()
    errors = sum(metric(during, "sonic_store_requests_total", operation=op, outcome="error") for op in ("head", "put"))
    assert errors > sum(metric(before, "sonic_store_requests_total", operation=op, outcome="error")
                        for op in ("head", "put"))
    assert live.call("GET", "/v1/jobs", key)[1]["jobs"] == []  # no job, and no input object
    assert live.s3.client().list_objects_v2(Bucket="studio", Prefix="svc/inputs/outage/").get("KeyCount", 0) == 0
    status, made = live.call("POST", "/v1/jobs", key, files=files, data={"preset": "quick"})
    assert status == 201  # the store is back: the same request works
    live.call("POST", f"/v1/jobs/{made['id']}/cancel", key)


def test_uploads_and_s3_events_start_each_object_once(live, tmp_path, tiny_dir):
    """A second service on its own database watches s3://studio/incoming/ and records jobs without running them
    (--no-executor): a photo+recording pair and a job description each start one job; a restart starts none
    again; S3 event notifications start one job per new object and none for one seen before."""
    client = live.s3.client()
    png = (tiny_dir / "inputs" / "portrait.png").read_bytes()
    wav = (tiny_dir / "inputs" / "speech.wav").read_bytes()
    secret = "events-secret-for-the-test"
    env = {**live.s3.env, "SONIC_EVENTS_SECRET": secret, "SONIC_WATCH_INTERVAL": "0.5"}
    database = f"sqlite:///{tmp_path / 'watch.db'}"
    args = ("--store", STORE, "--watch", "s3://studio/incoming/", "--no-executor")
    watcher = Service(tmp_path, database, *args, env=env)
    try:
        key, _ = watcher.key("acme")
        client.put_object(Bucket="studio", Key="incoming/acme/2026/monday.png", Body=png)
        client.put_object(Bucket="studio", Key="incoming/acme/2026/monday.wav", Body=wav)
        client.put_object(Bucket="studio", Key="incoming/acme/2026/lonely.png", Body=png)  # no recording: no job
        client.put_object(Bucket="studio", Key="incoming/acme/2026/described.json", Body=json.dumps(
            {"image": "monday.png", "audio": "monday.wav", "params": {"seed": 3, **FAST}}).encode())
        client.put_object(Bucket="studio", Key="incoming/nobody/x.json", Body=b"{}")  # no such tenant
        deadline = time.time() + 30
        while len(jobs := watcher.call("GET", "/v1/jobs", key)[1]["jobs"]) < 2:
            assert time.time() < deadline, watcher.log_path.read_text()[-2000:]
            time.sleep(0.3)
        time.sleep(2.0)  # several more rounds of the watcher: nothing more starts
        jobs = watcher.call("GET", "/v1/jobs", key)[1]["jobs"]
        assert len(jobs) == 2
        by_params = {json.dumps(j["params"], sort_keys=True): j for j in jobs}
        described = by_params[json.dumps({"seed": 3, **FAST}, sort_keys=True)]
        assert described["inputs"] == {"image": "s3://studio/incoming/acme/2026/monday.png",
                                       "audio": "s3://studio/incoming/acme/2026/monday.wav"}
        assert "no tenant 'nobody'" in watcher.log_path.read_text()
        watcher.stop()
        # restarted, with only events (the poller waits an hour): nothing seen before starts again
        watcher = Service(tmp_path, database, *args, env={**env, "SONIC_WATCH_INTERVAL": "3600"})
        event = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "studio"}, "object": {
            "key": "incoming/acme/2026/monday.wav", "eTag": "x"}}}]}
        assert watcher.call("POST", "/v1/events/s3", None, event, {"Authorization": "Bearer wrong"})[0] == 401
        status, reply = watcher.call("POST", "/v1/events/s3", None, event, {"Authorization": f"Bearer {secret}"})
        assert status == 200 and reply["started"] == []
        client.put_object(Bucket="studio", Key="incoming/acme/tuesday/take.png", Body=png)
        client.put_object(Bucket="studio", Key="incoming/acme/tuesday/take.wav", Body=wav)
        event["Records"][0]["s3"]["object"]["key"] = "incoming/acme/tuesday/take.wav"
        status, reply = watcher.call("POST", "/v1/events/s3", None, event, {"Authorization": f"Bearer {secret}"})
        assert status == 200 and len(reply["started"]) == 1
        status, again = watcher.call("POST", "/v1/events/s3", None, event, {"Authorization": f"Bearer {secret}"})
        assert again["started"] == []
        assert len(watcher.call("GET", "/v1/jobs", key)[1]["jobs"]) == 3
        # a changed object (a new ETag) is a new upload: one more job
        client.put_object(Bucket="studio", Key="incoming/acme/tuesday/take.wav", Body=wav + b"\0\0")
        status, reply = watcher.call("POST", "/v1/events/s3", None, event, {"Authorization": f"Bearer {secret}"})
        assert len(reply["started"]) == 1 and len(watcher.call("GET", "/v1/jobs", key)[1]["jobs"]) == 4
    finally:
        watcher.stop()


def test_a_job_running_when_the_service_dies_runs_again_after_a_restart(live, tiny_dir):
    """SIGKILL the service mid-render: after the restart the lapsed lease is expired, the orphaned prompt is
    interrupted on ComfyUI, and the job runs again to done (two attempts, one output)."""
    import signal

    key, made = job_from_keys(live, tiny_dir, "restarter", steps=6, seed=77)
    client = live.s3.client()
    wait_comfyui(live, lambda running: running, made["id"], key)
    live.process.send_signal(signal.SIGKILL)
    live.process.wait(30)
    live.http.close()
    live.log.close()
    restarted = Service(live.folder, live.database, "--store", STORE, "--comfyui", live.comfy.url,
                        env={k: v for k, v in live.env.items() if k.startswith(("SONIC_", "AWS_"))})
    live.__dict__.update({k: getattr(restarted, k) for k in ("process", "url", "http", "log")})
    job = wait_state(live, key, made["id"], ("done", "failed"))
    assert job["state"] == "done" and job["attempts"] == 2, job
    stored = client.get_object(Bucket="studio", Key=f"svc/restarter/jobs/{made['id']}/job.mp4")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == job["output"]["sha256"]
    assert client.list_objects_v2(Bucket="studio", Prefix=f"svc/restarter/jobs/{made['id']}/attempts/").get(
        "KeyCount", 0) == 0
    assert "go back to the queue" in live.log_path.read_text()


def test_presigned_post_of_the_s3_store_limits_key_type_and_size(live):
    key, _ = live.key("poster")
    status, grant = live.call("POST", "/v1/uploads", key, {"filename": "face.png", "content_type": "image/png"})
    assert status == 200 and grant["url"].startswith(live.s3.endpoint)
    day = time.strftime("%Y/%m/%d", time.gmtime())
    assert grant["key"].startswith(f"inputs/poster/{day}/") and grant["fields"]["key"] == f"svc/{grant['key']}"
    import base64

    policy = json.loads(base64.b64decode(grant["fields"]["policy"]))
    assert {"Content-Type": "image/png"} in policy["conditions"]
    assert ["content-length-range", 1, grant["max_bytes"]] in policy["conditions"]
    assert {"key": f"svc/{grant['key']}"} in policy["conditions"]
    assert grant["fields"]["x-amz-algorithm"] == "AWS4-HMAC-SHA256" and "x-amz-signature" in grant["fields"]
