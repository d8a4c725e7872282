"""The fleet (`python -m sonic submit | worker | status`, sonic/fleet/) against real servers on 127.0.0.1: Debian's
redis-server as the Celery broker (append-only file on), two ComfyUI 0.8.0 servers (--cpu, tiny models), rclone's
S3 server, and two worker processes, one per ComfyUI. Workers and CLI run where torch, numpy and ComfyUI cannot be
imported. The visibility timeout is 8 s here so that a killed worker's job comes back quickly.
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
from servers import ROOT, ComfyUI, RabbitMQ, Redis, S3Server, comfyui_dir

FAST = {"steps": 2, "min_resolution": 128, "duration": 1.0}
FILE_CHOICES = {"image", "audio", "sonic_unet"}  # combos listing files: checked by the workers' ComfyUI
NO_GPU_STACK = ("torch", "numpy", "comfy", "folder_paths", "diffusers", "transformers", "cv2", "av", "PIL", "librosa")
CLI = ("import sys\n"
       f"for name in {NO_GPU_STACK!r}: sys.modules[name] = None\n"
       "from sonic.cli import main\n"
       "sys.exit(main(sys.argv[1:]))\n")
VISIBILITY_S = 8


def snapshot_of(mappings) -> dict:
    """/object_info of the pack's nodes, as `submit` checks jobs without a ComfyUI: types and limits only."""
    schema = {}
    for name, cls in sorted(mappings.items()):
        parts = {}
        for part, inputs in cls.INPUT_TYPES().items():
            if part == "hidden":
                continue
            specs = {}
            for input_name, spec in inputs.items():
                opts = spec[1] if len(spec) > 1 else {}
                kept = {k: opts[k] for k in ("min", "max", "forceInput") if k in opts}
                specs[input_name] = ["STRING", {}] if input_name in FILE_CHOICES else [spec[0], kept]
            parts[part] = specs
        schema[name] = {"input": parts}
    return schema


def test_node_snapshot_matches_the_pack(comfy_env):
    from sonic.fleet.batches import SCHEMA_SNAPSHOT

    current = snapshot_of(comfy_env["mappings"])
    if os.environ.get("SONIC_WRITE_SCHEMA") == "1":
        SCHEMA_SNAPSHOT.write_text(json.dumps(current, indent=1) + "\n")
    assert json.loads(SCHEMA_SNAPSHOT.read_text()) == current, \
        "the nodes changed: SONIC_WRITE_SCHEMA=1 python -m pytest tests/fleet/test_fleet.py -k snapshot"


# -- against real servers ---------------------------------------------------------------------------------------
class Fleet:
    def __init__(self, top: Path, tiny_dir: Path):
        self.top, self.material = top, top / "material"
        self.material.mkdir()
        for name in ("portrait.png", "speech.wav"):
            shutil.copy(tiny_dir / "inputs" / name, self.material / name)
        from PIL import Image

        Image.linear_gradient("L").resize((144, 256)).convert("RGB").save(self.material / "noface.png")
        self.redis = Redis(top / "redis").start()
        self.comfy = [ComfyUI(top / name, tiny_dir, threads=1).start() for name in ("a", "b")]
        self.s3 = S3Server(top / "s3", ("studio",))
        for server in self.comfy:
            server.wait()
        self.workers: dict[str, subprocess.Popen] = {}
        self.serves: dict[str, int] = {}  # worker name -> index of its ComfyUI server
        self.env = {**os.environ, **self.s3.env, "PYTHONPATH": str(ROOT), "SONIC_BROKER_URL": self.redis.url,
                    "SONIC_VISIBILITY_TIMEOUT": str(VISIBILITY_S)}

    def start_worker(self, index: int, name: str | None = None, broker: str | None = None) -> str:
        """A worker for ComfyUI server `index`; its log is worker<name>.log."""
        name = name or f"w{index}@test"
        self.serves[name] = index
        before = len(self.log(name))  # a restarted worker appends to its log
        log = open(self.top / f"worker{name}.log", "a")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-c", CLI, "worker", "--comfyui", self.comfy[index].url, "--name", name,
             *(["--broker", broker] if broker else [])],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.top)
        deadline = time.time() + 60
        while "ready" not in self.log(name)[before:]:
            assert time.time() < deadline and self.workers[name].poll() is None, self.log(name)
            time.sleep(0.2)
        return name

    def wait_running(self, name: str, batch: str) -> None:
        """Until worker `name` runs a job of `batch` on its ComfyUI (the prompt is executing there)."""
        index = self.serves[name]
        deadline = time.time() + 120
        while True:
            queue = json.loads(urllib.request.urlopen(self.comfy[index].url + "/queue", timeout=10).read())
            if f"sonic.run_job[{batch}:" in self.log(name) and queue["queue_running"]:
                return
            assert time.time() < deadline, self.log(name)
            time.sleep(0.1)

    def log(self, name: str, since: int = 0) -> str:
        """Worker `name`'s log (from character `since`)."""
        path = self.top / f"worker{name}.log"
        return path.read_text()[since:] if path.exists() else ""

    def cli(self, *args, timeout=600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.material)

    def submit(self, rows: list[dict], name: str, *extra) -> str:
        """Queue rows as batch `name` (extra: more submit flags); -> the batch URI."""
        path = self.material / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = self.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", name, *extra)
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

    def restore(self) -> None:
        """Start again whatever a test killed or stopped (same ports and URLs), so that a failure stays in its test:
        the broker, each ComfyUI (and its worker, which may have stopped taking jobs), the two workers."""
        if self.redis.process.poll() is not None:
            self.redis.start()
        for index, server in enumerate(self.comfy):
            if server.process.poll() is not None:
                server.stop()
                server.start().wait()
                self.stop_worker(f"w{index}@test")
        for index in (0, 1):
            if self.workers[f"w{index}@test"].poll() is not None:
                self.start_worker(index)

    def stop_worker(self, name: str) -> None:
        process = self.workers[name]
        if process.poll() is None:
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
        self.s3.stop()
        for server in self.comfy:
            server.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def whole_fleet(tmp_path_factory, tiny_dir):
    comfyui_dir()
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), tiny_dir)
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
    report = json.loads(fleet.cli("status", uri, "--json").stdout)
    assert [f["id"] for f in report["failed_jobs"]] == ["noface"] and "NoFaceError" in report["failed_jobs"][0]["error"]
    for record in by_id.values():
        assert record["status"] == "done", record
        assert set(record["timings"]) == {"inputs", "queued", "running", "output"} and record["timings"]["running"] > 0
        data = urllib.request.urlopen(record["url"], timeout=30).read()  # the manifest's link
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        video = fleet.top / f"{record['id']}.mp4"
        video.write_bytes(data)
        with av.open(str(video)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 23 and container.streams.audio[0].codec_context.name == "aac"
    assert {r["worker"] for r in by_id.values()} == {"w0@test", "w1@test"}
    assert fleet.objects("renders/first/records/") == sorted(f"renders/first/records/{r['id']}.json" for r in rows)
    # local inputs went to the store once, whatever the number of jobs using them
    assert len(fleet.objects("renders/inputs/first/")) == 3


def test_bad_rows_are_not_queued(fleet):
    path = fleet.material / "bad.jsonl"
    path.write_text(json.dumps({"image": "portrait.png", "audio": "speech.wav", "steps": 0}) + "\n"
                    + json.dumps({"image": "/etc/hostname.png", "audio": "speech.wav"}) + "\n")
    result = fleet.cli("submit", str(path), "--out", "s3://studio/renders", "--batch", "bad")
    assert result.returncode == 2 and "steps: 0 is outside 1..200" in result.stderr and "not found" in result.stderr
    assert fleet.objects("renders/bad/") == []


def test_a_worker_killed_mid_job_loses_nothing(fleet):
    """w1 is killed while its job runs (had that job finished, w1 would be in the records); one job waits in the
    broker, so that the status report shows the broker's count (an empty Redis queue reports none)."""
    uri = fleet.submit(_jobs("k", 3, 100), "killed")
    victim = "w1@test"
    fleet.wait_running("w1@test", "killed")
    report = json.loads(fleet.cli("status", uri, "--json").stdout)  # queued / running / done / failed, per worker
    assert len(report["workers"][victim]["running"]) == 1 and report["running"] >= 1
    assert report["queued"] + report["running"] + report["done"] == 3 and report["broker_waiting"] is not None
    fleet.workers[victim].send_signal(signal.SIGKILL)
    fleet.workers[victim].wait(30)
    status, records = fleet.wait(uri)
    assert status == 0
    assert sorted(r["id"] for r in records) == ["k0", "k1", "k2"]
    assert all(r["status"] == "done" for r in records)
    # exactly one output object and one record per job
    assert fleet.objects("renders/killed/") == sorted(
        ["renders/killed/batch.json", "renders/killed/manifest.jsonl"]
        + [f"renders/killed/k{n}.mp4" for n in range(3)] + [f"renders/killed/records/k{n}.json" for n in range(3)])
    assert {r["worker"] for r in records} == {"w0@test"}  # the survivor made them all, the killed one's job too


def test_broker_restarted_mid_batch_loses_no_job(fleet):
    uri = fleet.submit(_jobs("r", 4, 200), "restart")
    deadline = time.time() + 120
    while not fleet.objects("renders/restart/records/"):
        assert time.time() < deadline
        time.sleep(0.2)
    fleet.redis.stop()  # queued jobs are in its append-only file
    fleet.redis.start()
    status, records = fleet.wait(uri)
    assert status == 0 and sorted(r["id"] for r in records) == ["r0", "r1", "r2", "r3"]
    assert len(fleet.objects("renders/restart/records/")) == 4


def test_sigterm_finishes_the_running_job_then_stops(fleet):
    uri = fleet.submit(_jobs("t", 2, 400, steps=6), "term")
    fleet.wait_running("w1@test", "term")
    worker = fleet.workers["w1@test"]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(120) == 0
    status, records = fleet.wait(uri)
    assert status == 0 and len(records) == 2
    assert "w1@test" in {r["worker"] for r in records}  # the job it was running finished there


def test_comfyui_dying_mid_job_is_retried_elsewhere(fleet):
    uri = fleet.submit(_jobs("c", 2, 500, steps=6), "crash", "--retries", "1")
    fleet.wait_running("w1@test", "crash")
    fleet.comfy[1].kill()
    status, records = fleet.wait(uri)
    assert status == 0 and {r["worker"] for r in records} == {"w0@test"}
    assert max(r["attempts"] for r in records) == 2  # the job that was running on the dead server: second attempt


def test_a_worker_whose_comfyui_is_down_takes_no_jobs(fleet):
    down, before = fleet.comfy[1], len(fleet.log("w1@test"))  # earlier tests wrote in that log too
    down.stop()
    uri = fleet.submit(_jobs("d", 3, 300), "down")
    status, records = fleet.wait(uri)
    assert status == 0 and {r["worker"] for r in records} == {"w0@test"}
    told = fleet.log("w1@test", before)
    assert "is not answering" in told and "takes no jobs until it is back" in told
    down.start().wait()  # the worker notices by itself
    deadline = time.time() + 60
    while "answers again" not in fleet.log("w1@test", before):
        assert time.time() < deadline, fleet.log("w1@test", before)
        time.sleep(0.5)


def test_rabbitmq_by_changing_only_the_broker_url(fleet):
    """The same commands with an amqp:// broker; a killed worker's job returns as soon as its connection drops."""
    rabbit = RabbitMQ(fleet.top / "rabbit").start()
    try:
        first = fleet.start_worker(0, "r0@test", rabbit.url)
        uri = fleet.submit(_jobs("q", 2, 600, steps=6), "rabbit", "--broker", rabbit.url)
        fleet.wait_running(first, "rabbit")
        fleet.workers[first].send_signal(signal.SIGKILL)
        fleet.workers[first].wait(30)
        fleet.start_worker(0, "r1@test", rabbit.url)
        status, records = fleet.wait(uri, "--broker", rabbit.url)
        assert status == 0 and sorted(r["id"] for r in records) == ["q0", "q1"]
        assert {r["worker"] for r in records} == {"r1@test"}
        assert len(fleet.objects("renders/rabbit/records/")) == 2
    finally:
        for name in ("r0@test", "r1@test"):
            if name in fleet.workers and fleet.workers[name].poll() is None:
                fleet.workers[name].terminate()
                fleet.workers[name].wait(60)
        rabbit.stop()
