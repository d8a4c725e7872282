"""The fleet's throughput with 1 and 2 workers, and the queue's per-job overhead against `batch` on one server.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/fleet_throughput.py [--jobs 8] [--steps 4]

Real servers on 127.0.0.1 (tests/servers.py): redis-server, rclone's S3 server, two ComfyUI 0.8.0 servers with
one CPU thread each (so two of them share this machine's cores fairly) and the tiny models. The same kind of
jobs (new seeds each run, so ComfyUI's cache never answers) go:
1. through `python -m sonic batch --out s3://...` on server A alone;
2. through `submit` to one worker (server A);
3. through `submit` to two workers (servers A and B).
Times run from the command's start to the last job's MP4 published in the store (polled every 0.1 s); the
fleet's job database is a SQLite file.
Results go to benchmarks/results/fleet_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import ComfyUI, Redis, S3Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference" / "sonic-tiny")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        sys.exit("set COMFYUI_DIR (../shared/comfyui/install.sh DEST prints it)")
    top = Path(tempfile.mkdtemp(prefix="sonic-fleet-bench-"))
    for name in ("portrait.png", "speech.wav"):
        shutil.copy(args.reference / "inputs" / name, top / name)
    redis = Redis(top / "redis").start()
    s3 = S3Server(top / "s3", ("bench",))
    comfy = [ComfyUI(top / name, args.reference, threads=1).start() for name in ("a", "b")]
    env = {**os.environ, **s3.env, "SONIC_BROKER_URL": redis.url, "PYTHONPATH": str(ROOT),
           "SONIC_DATABASE_URL": f"sqlite:///{top / 'jobs.db'}"}
    workers, results = [], {"jobs": args.jobs, "steps": args.steps, "cpu_count": os.cpu_count()}
    client = s3.client()

    def jobs_file(name: str, seed0: int) -> Path:
        rows = [{"id": f"j{n}", "image": "portrait.png", "audio": "speech.wav", "seed": seed0 + n,
                 "steps": args.steps, "min_resolution": 128, "duration": 1.0} for n in range(args.jobs)]
        path = top / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def sonic(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sonic", *argv], env=env, cwd=top, capture_output=True,
                              text=True, check=True)

    def wait_outputs(prefix: str, count: int) -> None:
        """Until `count` jobs' MP4s are published under prefix (attempt objects do not count)."""
        while sum(item["Key"].endswith(".mp4") and "/attempts/" not in item["Key"]
                  for item in client.list_objects_v2(Bucket="bench", Prefix=prefix).get("Contents", [])) < count:
            time.sleep(0.1)

    def fleet(name: str, seed0: int) -> float:
        started = time.perf_counter()
        sonic("submit", str(jobs_file(name, seed0)), "--out", "s3://bench/fleet", "--batch", name)
        wait_outputs(f"fleet/{name}/", args.jobs)
        return time.perf_counter() - started

    def start_worker(server: ComfyUI) -> None:
        log = open(top / f"worker-{server.port}.log", "w")
        workers.append(subprocess.Popen([sys.executable, "-m", "sonic", "worker", "--comfyui", server.url],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=top))
        while "ready" not in (top / f"worker-{server.port}.log").read_text():
            time.sleep(0.2)

    try:
        for server in comfy:
            server.wait()
        for n, server in enumerate(comfy):  # models loaded on both servers before anything is timed
            sonic("batch", str(jobs_file(f"warm{n}", 90_000 + 100 * n)), "--server", server.url, "--out", str(top / f"warm{n}"))
        started = time.perf_counter()
        sonic("batch", str(jobs_file("batch", 1000)), "--server", comfy[0].url, "--out", "s3://bench/batch")
        results["batch_1_server_s"] = time.perf_counter() - started
        start_worker(comfy[0])
        results["fleet_1_worker_s"] = fleet("one", 2000)
        start_worker(comfy[1])
        results["fleet_2_workers_s"] = fleet("two", 3000)
        results["queue_overhead_per_job_s"] = (results["fleet_1_worker_s"] - results["batch_1_server_s"]) / args.jobs
        results["speedup_2_workers"] = results["fleet_1_worker_s"] / results["fleet_2_workers_s"]
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(60)
        for server in comfy:
            server.stop()
        s3.stop()
        redis.stop()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet_throughput.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
