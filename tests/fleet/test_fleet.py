"""The fleet (`python -m sonic submit | worker | status`, sonic/fleet/) against real servers on 127.0.0.1: Debian's
redis-server as the Celery broker (append-only file on), PostgreSQL as the job database, two ComfyUI servers
(--cpu, tiny models; one 0.8.0, one 0.18.2), rclone's S3 server (it checks signatures), and two worker processes, one per ComfyUI. Workers
and CLI run where torch, numpy and ComfyUI cannot be imported.

Short settings make every fault visible within seconds: leases of 6 s, a reconciler round every 2 s, and a Redis
visibility timeout of 2 s, far shorter than a job, so that the broker redelivers running jobs to idle workers all
through the module. Every test counts the prompts in every ComfyUI's history: no job may run twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from servers import NEWEST, OLDEST, ROOT, ComfyUI, PostgreSQL, RabbitMQ, Redis, S3Server, comfyui_dir

FAST = {"steps": 2, "min_resolution": 128, "duration": 1.0}
NO_GPU_STACK = ("torch", "numpy", "comfy", "folder_paths", "diffusers", "transformers", "cv2", "av", "PIL", "librosa")
CLI = ("import sys\n"
       f"for name in {NO_GPU_STACK!r}: sys.modules[name] = None\n"
       "from sonic.cli import main\n"
       "sys.exit(main(sys.argv[1:]))\n")
VISIBILITY_S = 2
LEASE_S = 6


# -- against real servers ---------------------------------------------------------------------------------------
class Fleet:
    def __init__(self, top: Path, tiny_dir: Path):
        self.top, self.material, self.tiny_dir = top, top / "material", tiny_dir
        self.material.mkdir()
        for name in ("portrait.png", "speech.wav"):
            shutil.copy(tiny_dir / "inputs" / name, self.material / name)
        from PIL import Image

        Image.linear_gradient("L").resize((144, 256)).convert("RGB").save(self.material / "noface.png")
        self.redis = self.postgres = self.s3 = None
        self.comfy: list[ComfyUI] = []
        self.workers: dict[str, subprocess.Popen] = {}
        try:
            self.redis = Redis(top / "redis").start()
            self.postgres = PostgreSQL(top / "pg").start()
            # one worker's ComfyUI of each tested version
            self.comfy = [ComfyUI(top / name, tiny_dir, threads=1, version=version).start()
                          for name, version in (("a", OLDEST), ("b", NEWEST))]
            self.s3 = S3Server(top / "s3", ("studio",))
            for server in self.comfy:
                server.wait()
        except BaseException:
            self.stop()
            raise
        self.serves: dict[str, ComfyUI] = {}  # worker name -> its ComfyUI server
        self.env = {**os.environ, **self.s3.env, "PYTHONPATH": str(ROOT), "SONIC_BROKER_URL": self.redis.url,
                    "SONIC_DATABASE_URL": self.postgres.url, "SONIC_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
                    "SONIC_LEASE_SECONDS": str(LEASE_S), "SONIC_RECONCILE_INTERVAL": "2",
                    "SONIC_RECONCILE_GRACE": "10", "SONIC_FLEET_OUT": "s3://studio/renders"}

    def start_worker(self, index: int, name: str | None = None, broker: str | None = None,
                     server: ComfyUI | None = None) -> str:
        """A worker for ComfyUI server `index` (or `server`); its log is worker<name>.log."""
        name = name or f"w{index}@test"
        self.serves[name] = server or self.comfy[index]
        before = len(self.log(name))  # a restarted worker appends to its log
        log = open(self.top / f"worker{name}.log", "a")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-c", CLI, "worker", "--comfyui", self.serves[name].url, "--name", name,
             *(["--broker", broker] if broker else [])],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.top)
        deadline = time.time() + 60
        while "ready" not in self.log(name)[before:]:
            assert time.time() < deadline and self.workers[name].poll() is None, self.log(name)
            time.sleep(0.2)
        return name

    def running_on(self, prefix: str, names=("w0@test", "w1@test")) -> str:
        """Until a worker of `names` runs a job whose id starts with `prefix` on its ComfyUI -> that worker's name."""
        deadline = time.time() + 120
        while True:
            for name in names:
                queue = json.loads(urllib.request.urlopen(self.serves[name].url + "/queue", timeout=10).read())
                for item in queue["queue_running"]:
                    encoder = [n for n in item[2].values() if n["class_type"] == "SonicVideoEncode"]
                    if encoder and encoder[0]["inputs"]["filename_prefix"].startswith(f"sonic-fleet/{prefix}"):
                        return name
            assert time.time() < deadline
            time.sleep(0.1)

    def log(self, name: str, since: int = 0) -> str:
        """Worker `name`'s log (from character `since`)."""
        path = self.top / f"worker{name}.log"
        return path.read_text()[since:] if path.exists() else ""

    def cli(self, *args, timeout=600, env=None, code=CLI) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=self.material)

    def submit(self, rows: list[dict], name: str, *extra, code=CLI) -> str:
        """Queue rows as batch `name` (extra: more submit flags); -> the batch URI."""
        path = self.material / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = self.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", name, *extra, code=code)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def wait(self, uri: str, *extra) -> tuple[int, list[dict]]:
        result = self.cli("status", uri, "--wait", "--json", *extra)
        assert result.returncode in (0, 1), result.stderr
        key = uri.split("/", 3)[3]
        manifest = self.s3.client().get_object(Bucket="studio", Key=f"{key}/manifest.jsonl")["Body"].read().decode()
        return result.returncode, [json.loads(line) for line in manifest.splitlines()]

    def objects(self, prefix: str) -> list[str]:
        reply = self.s3.client().list_objects_v2(Bucket="studio", Prefix=prefix)
        return sorted(item["Key"] for item in reply.get("Contents", []))

    def prompts(self, prefix: str, servers=None) -> dict[str, int]:
        """How many prompts each job (by its output's name, under sonic-fleet/<prefix>) had in every ComfyUI."""
        counts: dict[str, int] = {}
        for server in servers or self.comfy:
            history = json.loads(urllib.request.urlopen(server.url + "/history", timeout=10).read())
            queue = json.loads(urllib.request.urlopen(server.url + "/queue", timeout=10).read())
            prompts = [entry["prompt"] for entry in history.values()] + queue["queue_running"] + queue["queue_pending"]
            for prompt in prompts:
                for node in prompt[2].values():
                    if node["class_type"] == "SonicVideoEncode":
                        name = node["inputs"]["filename_prefix"].removeprefix("sonic-fleet/")
                        if name.startswith(prefix):
                            counts[name] = counts.get(name, 0) + 1
        return counts

    def jobdb(self):
        from sonic.jobdb import JobDB

        return JobDB(self.postgres.url)

    def attempts(self, batch: str) -> dict[str, list[str]]:
        """Each job's attempts trail (outcomes, in order) from the job database."""
        db = self.jobdb()
        try:
            rows = db.job_rows(db.batch(batch)["id"])
            return {row["name"]: [a["outcome"] for a in db.attempt_rows(row["id"])] for row in rows}
        finally:
            db.close()

    def attempt_workers(self, batch: str) -> set[str]:
        """Every worker that claimed a job of the batch (from the attempts table)."""
        db = self.jobdb()
        try:
            return {a["worker"] for row in db.job_rows(db.batch(batch)["id"]) for a in db.attempt_rows(row["id"])
                    if a["worker"]}
        finally:
            db.close()

    def history_of(self, server: ComfyUI, job_id: str) -> list[dict]:
        """The history entries of a job's prompts on one ComfyUI."""
        history = json.loads(urllib.request.urlopen(server.url + "/history", timeout=10).read())
        return [entry for entry in history.values() if any(
            node["class_type"] == "SonicVideoEncode" and node["inputs"]["filename_prefix"] == f"sonic-fleet/{job_id}"
            for node in entry["prompt"][2].values())]

    def restore(self) -> None:
        """Start again whatever a test killed or stopped (same ports and URLs), so that a failure stays in its test:
        the broker, the database, the store, each ComfyUI (and its worker, which may have stopped taking jobs), the
        two workers."""
        if self.redis.process.poll() is not None:
            self.redis.start()
        if not self.postgres.pids():
            self.postgres.start()
        if self.s3.process.poll() is not None:
            self.s3.start()
        for index, server in enumerate(self.comfy):
            if server.process.poll() is not None:
                server.stop()
                server.start().wait()
                self.stop_worker(f"w{index}@test")
        for index in (0, 1):
            process = self.workers[f"w{index}@test"]
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
            else:
                self.start_worker(index)

    def stop_worker(self, name: str) -> None:
        process = self.workers[name]
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)
        for server in [self.s3, *self.comfy, self.redis]:
            if server is not None:
                server.stop()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres.close()


@pytest.fixture(scope="module")
def whole_fleet(tmp_path_factory, tiny_dir):
    comfyui_dir(), comfyui_dir(NEWEST)  # skip (or fail in CI) before starting anything
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), tiny_dir)  # stops what it started when a start fails
    try:
        fleet.start_worker(0)
        fleet.start_worker(1)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture()
def fleet(whole_fleet):
    """The fleet, whole again after the test whatever it killed and however it ended."""
    try:
        yield whole_fleet
    finally:
        whole_fleet.restore()


def _jobs(prefix: str, count: int, seed0: int, **extra) -> list[dict]:
    return [{"id": f"{prefix}{n}", "image": "portrait.png", "audio": "speech.wav", "seed": seed0 + n, **FAST, **extra}
            for n in range(count)]


def _once_each(fleet, batch: str, ids: list[str]) -> None:
    """Every job of the batch ran exactly once in all the ComfyUIs and ended done at its first finished attempt."""
    counts = fleet.prompts("")
    assert {job_id: counts.get(job_id, 0) for job_id in ids} == {job_id: 1 for job_id in ids}
    trails = fleet.attempts(batch)
    assert all(trails[job_id] == ["done"] for job_id in ids), trails


def test_jobs_over_two_workers_and_a_bad_input(fleet):
    import av

    rows = _jobs("j", 4, 10) + [{"id": "noface", "image": "noface.png", "audio": "speech.wav", **FAST}]
    uri = fleet.submit(rows, "first")
    assert uri == "s3://studio/renders/first"
    status, records = fleet.wait(uri)
    assert status == 1  # the bad input
    by_id = {r["id"]: r for r in records}
    assert list(by_id) == [r["id"] for r in rows]
    bad = by_id.pop("noface")
    assert bad["status"] == "failed" and bad["attempts"] == 1 and "NoFaceError" in bad["error"]
    # status names each failed job with its reason, and says so in its exit status
    text = fleet.cli("status", uri)
    assert text.returncode == 1 and "failed noface: " in text.stdout and "NoFaceError" in text.stdout, text.stdout
    report = json.loads(fleet.cli("status", "first", "--json").stdout)  # by name too
    assert [f["id"] for f in report["failed_jobs"]] == ["noface"] and "NoFaceError" in report["failed_jobs"][0]["error"]
    assert report["broker_waiting"] == 0  # an empty Redis queue: nothing waits (not "unknown")
    history = "".join(urllib.request.urlopen(s.url + "/history", timeout=10).read().decode() for s in fleet.comfy)
    for record in by_id.values():
        assert record["status"] == "done", record
        assert set(record["timings"]) == {"inputs", "queued", "running", "output"} and record["timings"]["running"] > 0
        # what the lip-sync calibration measured and did, in the node's own words (as in batch manifests)
        assert isinstance(record["offset"], float) and isinstance(record["lipsync_applied"], bool)
        assert record["lipsync_message"] and (record["lipsync_applied"] == (record["lipsync_applied_s"] not in (0, None)))
        data = urllib.request.urlopen(record["url"], timeout=30).read()  # the manifest's link
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        video = fleet.top / f"{record['id']}.mp4"
        video.write_bytes(data)
        with av.open(str(video)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 23 and container.streams.audio[0].codec_context.name == "aac"
            embedded = json.dumps(dict(container.metadata))
        # s3:// inputs reached ComfyUI as uploaded files: no link, signature or key id in the MP4 or the history
        assert "renders/inputs/first" not in embedded and "sonic-fleet/" in embedded
        for secret in ("X-Amz", "Signature", "Credential", S3Server.KEY):
            assert secret not in embedded and secret not in history
    assert {r["worker"] for r in by_id.values()} == {"w0@test", "w1@test"}
    assert fleet.objects("renders/first/") == sorted([f"renders/first/{r['id']}.mp4" for r in rows if r["id"] != "noface"]
                                                     + ["renders/first/manifest.jsonl"])  # no attempt left behind
    # local inputs went to the store once, whatever the number of jobs using them
    assert len(fleet.objects("renders/inputs/first/")) == 3
    _once_each(fleet, "first", [r["id"] for r in rows if r["id"] != "noface"])
    assert fleet.attempts("first")["noface"] == ["failed"] and fleet.prompts("noface") == {"noface": 1}


def test_bad_rows_are_not_queued(fleet):
    path = fleet.material / "bad.jsonl"
    path.write_text(json.dumps({"image": "portrait.png", "audio": "speech.wav", "steps": 0}) + "\n"
                    + json.dumps({"image": "/etc/hostname.png", "audio": "speech.wav"}) + "\n")
    result = fleet.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", "bad")
    assert result.returncode == 2 and "steps: 0 is outside 1..200" in result.stderr and "not found" in result.stderr
    assert fleet.objects("renders/inputs/bad/") == [] and fleet.objects("renders/bad/") == []
    missing = fleet.cli("status", "bad")
    assert missing.returncode == 2 and "no batch 'bad'" in missing.stderr


def test_a_wrong_broker_password_is_one_line_before_anything_is_stored(fleet):
    path = fleet.material / "pw.jsonl"
    path.write_text(json.dumps({"id": "p0", "image": "portrait.png", "audio": "speech.wav", **FAST}) + "\n")
    broker = fleet.redis.url.replace("redis://", "redis://intruder:hunter2@")  # an ACL user Redis does not know
    result = fleet.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", "pw", "--broker", broker)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--broker / SONIC_BROKER_URL" in result.stderr and "hunter2" not in result.stderr
    assert fleet.objects("renders/inputs/pw/") == [] and "no batch" in fleet.cli("status", "pw").stderr


def test_a_worker_killed_mid_job_loses_nothing(fleet):
    """The worker is SIGKILLed while its job runs: the job's lease lapses, the reconciler queues it again, the other
    worker runs it, and the orphaned prompt on the dead worker's ComfyUI is interrupted."""
    uri = fleet.submit(_jobs("k", 2, 100, steps=10), "killed")  # long enough to be interrupted mid-way
    victim = fleet.running_on("k")
    report = json.loads(fleet.cli("status", uri, "--json").stdout)  # queued / running / done / failed, per worker
    assert len(report["workers"][victim]["running"]) == 1 and report["running"] >= 1
    assert report["queued"] + report["running"] + report["done"] == 2
    (orphan,) = report["workers"][victim]["running"]
    fleet.workers[victim].send_signal(signal.SIGKILL)
    fleet.workers[victim].wait(30)
    status, records = fleet.wait(uri)
    assert status == 0 and [r["id"] for r in records] == ["k0", "k1"]
    assert all(r["status"] == "done" for r in records)
    trails = fleet.attempts("killed")
    assert trails[orphan] == ["lease expired", "done"] and sorted(trails.values()) == [["done"], ["lease expired", "done"]]
    retried = next(r for r in records if r["id"] == orphan)
    assert retried["attempts"] == 2 and retried["worker"] != victim
    assert fleet.objects("renders/killed/") == sorted(
        [f"renders/killed/k{n}.mp4" for n in range(2)] + ["renders/killed/manifest.jsonl"])
    # the orphaned prompt was interrupted on the dead worker's ComfyUI by the reconciler, not left rendering
    (entry,) = fleet.history_of(fleet.serves[victim], orphan)
    assert entry["status"]["status_str"] != "success"
    assert "execution_interrupted" in [message[0] for message in entry["status"]["messages"]], entry["status"]


def test_a_redelivery_far_shorter_than_the_job_runs_nothing_twice(fleet):
    """Redis hands the running job's unacknowledged message to the idle worker every 2 s (the visibility timeout):
    the idle worker finds the job under a live lease and runs nothing."""
    idle = {name: len(fleet.log(name)) for name in ("w0@test", "w1@test")}
    uri = fleet.submit(_jobs("v", 1, 160, steps=8), "redelivered")
    busy = fleet.running_on("v")
    (other,) = set(idle) - {busy}
    status, records = fleet.wait(uri)
    assert status == 0 and records[0]["worker"] == busy and records[0]["attempts"] == 1
    db = fleet.jobdb()
    try:
        (row,) = db.job_rows(db.batch("redelivered")["id"])
    finally:
        db.close()
    assert f"job #{row['id']} not taken: running on {busy} under a lease" in fleet.log(other, idle[other])
    assert fleet.prompts("v") == {"v0": 1} and fleet.attempts("redelivered") == {"v0": ["done"]}


def test_a_worker_frozen_past_its_lease_has_its_late_result_refused(fleet):
    """SIGSTOP: the worker is alive but silent (a long GC pause, a frozen VM). Another worker finishes the job;
    when the frozen one wakes up, nothing it does changes the job."""
    uri = fleet.submit(_jobs("z", 1, 150, steps=8), "frozen")
    frozen = fleet.running_on("z")
    (other,) = {"w0@test", "w1@test"} - {frozen}
    since = len(fleet.log(frozen))
    fleet.workers[frozen].send_signal(signal.SIGSTOP)
    fleet.running_on("z", [other])  # the other worker holds the job now: wake the frozen one while it does
    fleet.workers[frozen].send_signal(signal.SIGCONT)
    status, records = fleet.wait(uri)
    (record,) = records
    assert status == 0 and record["worker"] == other and record["attempts"] == 2
    deadline = time.time() + 60
    while "succeeded in" not in fleet.log(frozen, since):  # the frozen worker's task has ended, whatever it did
        assert time.time() < deadline, fleet.log(frozen, since)
        time.sleep(0.5)
    told = fleet.log(frozen, since)
    assert "another worker took it" in told or "was refused" in told, told
    db = fleet.jobdb()
    try:
        (row,) = db.job_rows(db.batch("frozen")["id"])
    finally:
        db.close()
    assert (row["state"], row["worker"], row["sha256"]) == ("done", record["worker"], record["sha256"])
    assert fleet.attempts("frozen") == {"z0": ["lease expired", "done"]}
    stored = fleet.s3.client().get_object(Bucket="studio", Key="renders/frozen/z0.mp4")
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == record["sha256"]
    metadata = {key.lower(): value for key, value in stored["Metadata"].items()}
    assert metadata.get("sonic-prompt-id") == record["prompt_id"], metadata  # the holder's render, not the late one
    assert fleet.objects("renders/frozen/attempts/") == []


def test_a_store_outage_longer_than_every_retry_loses_and_doubles_nothing(fleet):
    since = {name: len(fleet.log(name)) for name in ("w0@test", "w1@test")}
    uri = fleet.submit(_jobs("s", 3, 170), "outage")
    fleet.running_on("s")
    fleet.s3.stop()  # for longer than boto3's retries: until a finished render's upload has failed and waits
    deadline = time.time() + 120
    while not any("MP4: " in fleet.log(name, since[name]) and "trying again" in fleet.log(name, since[name])
                  for name in since):
        assert time.time() < deadline
        time.sleep(0.5)
    time.sleep(5)
    fleet.s3.start()  # the same address
    status, records = fleet.wait(uri)
    assert status == 0 and [r["status"] for r in records] == ["done"] * 3
    assert fleet.prompts("s") == {"s0": 1, "s1": 1, "s2": 1}  # an outage hands a job back before or after ComfyUI
    trails = fleet.attempts("outage")
    assert all(trail.count("done") == 1 and "retry" not in trail for trail in trails.values()), trails
    assert fleet.objects("renders/outage/") == sorted(
        [f"renders/outage/s{n}.mp4" for n in range(3)] + ["renders/outage/manifest.jsonl"])


def test_a_forged_message_runs_nothing(fleet):
    """Anything that can write to the broker can only ring for a job the database has."""
    from celery import Celery

    before = fleet.prompts("")
    since = {name: len(fleet.log(name)) for name in ("w0@test", "w1@test")}
    app = Celery("forger", broker=fleet.redis.url, set_as_current=False)
    foreign = {"batch": "s3://attacker/loot", "workflow": {"1": {"class_type": "SaveImage", "inputs": {}}},
               "job": {"id": "x", "image": {"kind": "url", "location": "http://127.0.0.1/x.png"}}}
    db = fleet.jobdb()
    try:
        (done_row,) = [row for row in db.job_rows(db.batch("first")["id"]) if row["name"] == "j0"]
    finally:
        db.close()
    lengths = [len(json.loads(urllib.request.urlopen(s.url + "/history", timeout=10).read())) for s in fleet.comfy]
    for message in (foreign, 987654, True, str(done_row["id"]), done_row["id"]):
        app.send_task("sonic.run_job", args=[message], queue="sonic")
    deadline = time.time() + 60
    told = ""
    while not (told.count("refused a message that is not a job id") == 3 and "no such job" in told
               and "already done" in told):
        assert time.time() < deadline, told
        time.sleep(0.5)
        told = "".join(fleet.log(name, since[name]) for name in since)
    assert fleet.prompts("") == before
    assert [len(json.loads(urllib.request.urlopen(s.url + "/history", timeout=10).read())) for s in fleet.comfy] == lengths
    db = fleet.jobdb()
    try:
        (after,) = [row for row in db.job_rows(db.batch("first")["id"]) if row["name"] == "j0"]
        trail = db.attempt_rows(after["id"])
    finally:
        db.close()
    assert (after["token"], after["attempts"], after["state"], len(trail)) == \
        (done_row["token"], done_row["attempts"], "done", done_row["attempts"])


def test_a_batch_outside_the_workers_prefix_waits_with_the_reason(fleet):
    """The workers run only batches under SONIC_FLEET_OUT (s3://studio/renders): one stored elsewhere is handed back,
    never run and never failed, and status says why it waits."""
    path = fleet.material / "elsewhere.jsonl"
    path.write_text(json.dumps({"id": "o0", "image": "portrait.png", "audio": "speech.wav", **FAST}) + "\n")
    result = fleet.cli("submit", str(path), "--out", "s3://studio/elsewhere", "--batch", "elsewhere")
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 60
    while True:
        report = json.loads(fleet.cli("status", "elsewhere", "--json").stdout)
        if report["waiting_jobs"]:
            break
        assert time.time() < deadline, report
        time.sleep(1)
    (waiting,) = report["waiting_jobs"]
    assert waiting["id"] == "o0" and "is not under this worker's --out-prefix s3://studio/renders" in waiting["error"]
    assert (report["queued"], report["failed"], report["done"]) == (1, 0, 0)
    text = fleet.cli("status", "elsewhere")
    assert text.returncode == 0 and "waiting o0: refused by worker" in text.stdout, text.stdout
    assert fleet.prompts("o") == {} and fleet.objects("elsewhere/elsewhere/") == []  # no output, no attempt
    db = fleet.jobdb()  # the operator gives it up (the API's cancel comes with the service)
    try:
        from sqlalchemy import update

        from sonic.jobdb.schema import jobs

        with db.engine.begin() as connection:
            connection.execute(update(jobs).where(jobs.c.batch_id == db.batch("elsewhere")["id"]).values(state="cancelled"))
    finally:
        db.close()


def test_submit_killed_half_way_the_reconciler_queues_the_rest_once(fleet):
    """submit dies after queueing the first message (the batch is in the database): the rest are queued by the
    reconciler, each job runs once."""
    crash = CLI.replace("from sonic.cli import main\n",
                        "import os\nimport sonic.fleet.batches as b\n"
                        "def ring(app, ids):\n    b.ring_real(app, ids[:1]); os._exit(9)\n"
                        "b.ring_real, b.ring = b.ring, ring\nfrom sonic.cli import main\n")
    path = fleet.material / "half.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _jobs("h", 3, 190)))
    result = fleet.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", "half", code=crash)
    assert result.returncode == 9
    status, records = fleet.wait("s3://studio/renders/half")
    assert status == 0 and [r["status"] for r in records] == ["done"] * 3
    _once_each(fleet, "half", ["h0", "h1", "h2"])


def test_broker_and_database_restarted_mid_batch_lose_no_job(fleet):
    uri = fleet.submit(_jobs("r", 4, 200), "restart")
    fleet.running_on("r")
    since = {name: len(fleet.log(name)) for name in ("w0@test", "w1@test")}
    fleet.redis.stop()  # queued messages are in its append-only file
    fleet.redis.start()
    fleet.postgres.stop()  # longer than a heartbeat's period: the running job's worker sees it
    time.sleep(LEASE_S / 2)
    fleet.postgres.start()
    told = "".join(fleet.log(name, since[name]) for name in since)
    assert "could not renew its lease" in told or "is unreachable" in told, told
    status, records = fleet.wait(uri)
    assert status == 0 and [r["status"] for r in records] == ["done"] * 4
    _once_each(fleet, "restart", ["r0", "r1", "r2", "r3"])


def test_sigterm_finishes_the_running_job_then_stops(fleet):
    uri = fleet.submit(_jobs("t", 2, 400, steps=6), "term")
    name = fleet.running_on("t")
    (running,) = json.loads(fleet.cli("status", uri, "--json").stdout)["workers"][name]["running"]
    worker = fleet.workers[name]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0
    status, records = fleet.wait(uri)
    assert status == 0 and len(records) == 2
    finished = next(r for r in records if r["id"] == running)  # the job it was running finished there, once
    assert finished["worker"] == name and finished["attempts"] == 1 and fleet.attempts("term")[running] == ["done"]


def test_comfyui_dying_mid_job_is_retried_elsewhere(fleet):
    uri = fleet.submit(_jobs("c", 2, 500, steps=6), "crash", "--retries", "0")
    name = fleet.running_on("c")
    fleet.serves[name].kill()
    status, records = fleet.wait(uri)  # an outage is not the job's failure: --retries 0 is enough
    assert status == 0 and name not in {r["worker"] for r in records}
    assert max(r["attempts"] for r in records) == 2  # the job that was running on the dead server: second attempt


def test_a_worker_whose_comfyui_is_down_takes_no_jobs(fleet):
    down, before = fleet.comfy[1], len(fleet.log("w1@test"))  # earlier tests wrote in that log too
    down.stop()
    deadline = time.time() + 30
    while "takes no jobs until this is fixed" not in fleet.log("w1@test", before):  # its health check noticed
        assert time.time() < deadline, fleet.log("w1@test", before)
        time.sleep(0.3)
    assert "does not answer" in fleet.log("w1@test", before)
    uri = fleet.submit(_jobs("d", 3, 300), "down")
    status, records = fleet.wait(uri)
    assert status == 0 and {r["worker"] for r in records} == {"w0@test"}
    assert fleet.attempt_workers("down") == {"w0@test"}  # paused really: it did not even claim one
    down.start().wait()  # the worker notices by itself
    deadline = time.time() + 60
    while "takes jobs again" not in fleet.log("w1@test", before):
        assert time.time() < deadline, fleet.log("w1@test", before)
        time.sleep(0.5)
    fleet.workers["w0@test"].send_signal(signal.SIGSTOP)  # and really does: the only worker left awake
    try:
        status, records = fleet.wait(fleet.submit(_jobs("e", 1, 320), "again"))
    finally:
        fleet.workers["w0@test"].send_signal(signal.SIGCONT)
    assert status == 0 and records[0]["worker"] == "w1@test"


def test_a_comfyui_without_the_model_takes_no_job_and_says_why(fleet):
    empty = fleet.top / "empty-models"
    empty.mkdir(exist_ok=True)
    bare = ComfyUI(fleet.top / "bare", empty, threads=1).start()
    try:
        bare.wait()
        name = fleet.start_worker(0, "bare", server=bare)  # a name without @: Celery calls it celery@bare
        deadline = time.time() + 30
        while "takes no jobs until this is fixed" not in fleet.log(name):
            assert time.time() < deadline, fleet.log(name)
            time.sleep(0.3)
        told = fleet.log(name)
        assert "lacks model files: Sonic/unet.pth" in told and "python -m sonic download" in told, told
        uri = fleet.submit(_jobs("m", 2, 600), "nomodel")
        status, records = fleet.wait(uri)
        assert status == 0 and "bare" not in {r["worker"] for r in records}
        assert fleet.prompts("m", [bare]) == {} and "bare" not in fleet.attempt_workers("nomodel")
    finally:
        if "bare" in fleet.workers:
            fleet.stop_worker("bare")
        bare.stop()


def test_rabbitmq_by_changing_only_the_broker_url(fleet):
    """The same commands with an amqp:// broker and a SQLite job database; the broker restarted mid-batch and a
    killed worker lose nothing."""
    rabbit = RabbitMQ(fleet.top / "rabbit").start()
    sqlite = {"SONIC_DATABASE_URL": f"sqlite:///{fleet.top / 'rabbit-jobs.db'}"}  # SQLite shared by the processes
    saved = dict(fleet.env)
    fleet.env.update(sqlite)
    try:
        first = fleet.start_worker(0, "r0@test", rabbit.url)
        uri = fleet.submit(_jobs("q", 2, 700, steps=6), "rabbit", "--broker", rabbit.url)
        fleet.running_on("q", [first])
        fleet.workers[first].send_signal(signal.SIGKILL)
        fleet.workers[first].wait(30)
        rabbit.stop()
        rabbit.start()
        fleet.start_worker(0, "r1@test", rabbit.url)
        status, records = fleet.wait(uri, "--broker", rabbit.url)
        assert status == 0 and [r["id"] for r in records] == ["q0", "q1"]
        assert {r["worker"] for r in records} == {"r1@test"}
        from sonic.jobdb import JobDB

        db = JobDB(sqlite["SONIC_DATABASE_URL"])
        try:
            trails = [[a["outcome"] for a in db.attempt_rows(row["id"])] for row in db.job_rows(db.batch("rabbit")["id"])]
        finally:
            db.close()
        assert all(trail.count("done") == 1 for trail in trails) and ["lease expired", "done"] in trails, trails
    finally:
        fleet.env.clear()
        fleet.env.update(saved)
        for name in ("r0@test", "r1@test"):
            if name in fleet.workers and fleet.workers[name].poll() is None:
                fleet.workers[name].terminate()
                fleet.workers[name].wait(60)
        rabbit.stop()


def test_the_service_runs_jobs_from_store_keys_on_the_fleet_and_cancels_a_running_one(fleet):
    """`python -m sonic serve` in fleet mode (this broker, this PostgreSQL, this store): a job made from keys under
    the tenant's inputs/ prefix runs on the workers and its link gives the stored bytes; a running job is cancelled
    and leaves ComfyUI's queue."""
    pytest.importorskip("fastapi")
    from servers import log_size, wait_listening

    client = fleet.s3.client()
    for name in ("portrait.png", "speech.wav"):
        client.upload_file(str(fleet.material / name), "studio", f"renders/inputs/acme/2026/12/06/{name}")
    made = fleet.cli("serve", "keys", "create", "--tenant", "acme")
    assert made.returncode == 0, made.stderr
    key = dict(line.split(": ", 1) for line in made.stdout.splitlines())["api_key"]
    log_path = fleet.top / "service.log"
    log = open(log_path, "a")
    service = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--listen", "127.0.0.1:0", "--store",
                                "s3://studio/renders"], env=fleet.env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=fleet.top)
    try:
        url = f"http://127.0.0.1:{wait_listening(service, 0, log_path, log_size(log_path), 60, 'sonic serve')}"

        def call(method, path, body=None):
            request = urllib.request.Request(url + path, method=method, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                data=None if body is None else json.dumps(body).encode())
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        inputs = {"image": "inputs/acme/2026/12/06/portrait.png", "audio": "inputs/acme/2026/12/06/speech.wav"}
        first = call("POST", "/v1/jobs", {**inputs, "params": {**FAST, "seed": 900}})
        deadline = time.time() + 180
        while (job := call("GET", f"/v1/jobs/{first['id']}"))["state"] not in ("done", "failed"):
            assert time.time() < deadline, job
            time.sleep(1)
        assert job["state"] == "done" and job["output"]["expires_at"], job
        data = urllib.request.urlopen(job["output"]["url"], timeout=30).read()
        stored = client.get_object(Bucket="studio", Key=f"renders/acme/jobs/{first['id']}/job.mp4")["Body"].read()
        assert data == stored and hashlib.sha256(data).hexdigest() == job["output"]["sha256"] == \
            hashlib.sha256(stored).hexdigest() and len(data) == job["output"]["bytes"]
        # a running job, cancelled: its prompt leaves ComfyUI's queue and nothing is stored
        second = call("POST", "/v1/jobs", {**inputs, "params": {**FAST, "seed": 901, "steps": 12}})
        while call("GET", f"/v1/jobs/{second['id']}")["state"] != "running":
            assert time.time() < deadline + 120
            time.sleep(0.3)
        fleet.running_on("job")
        assert call("POST", f"/v1/jobs/{second['id']}/cancel")["state"] == "cancelled"
        deadline = time.time() + 30
        while any(json.loads(urllib.request.urlopen(s.url + "/queue", timeout=10).read())["queue_running"]
                  for s in fleet.comfy):
            assert time.time() < deadline
            time.sleep(0.5)
        time.sleep(LEASE_S / 2)  # the worker's next heartbeat has seen the cancel
        assert call("GET", f"/v1/jobs/{second['id']}")["state"] == "cancelled"
        assert fleet.objects(f"renders/acme/jobs/{second['id']}/") == []
    finally:
        service.terminate()
        service.wait(30)
        log.close()
