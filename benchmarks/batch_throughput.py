"""Batch runner overhead and throughput against real ComfyUI servers (tiny models, CPU).

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/batch_throughput.py [--jobs 8] [--steps 10]

1. Overhead: the same jobs run one after another straight through the queue API (upload, POST /prompt, wait on
   the websocket, /history, /view), then through `python -m sonic batch` on the same single server. Reported:
   wall time of both, and the batch's own work per job (inputs to the server, fetching and storing the MP4, from
   the manifest's timings) against the job's execution time inside ComfyUI.
2. Throughput: the batch over 1 server and over 2 servers (one CPU thread each, so that two servers on this
   machine do not fight over cores), and 1 server with every core.
Results go to benchmarks/results/batch_throughput.json.
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

from servers import ComfyUI  # noqa: E402  (tests/servers.py: real servers on loopback)

from sonic.jobs.comfy_api import ComfyServer, execution_seconds  # noqa: E402
from sonic.jobs.jobsfile import Workflow  # noqa: E402


def batch(jobs: Path, servers: list[ComfyUI], out: Path) -> tuple[float, list[dict]]:
    args = [sys.executable, "-m", "sonic", "batch", str(jobs), "--out", str(out), "--json"]
    for server in servers:
        args += ["--server", server.url]
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - started
    return wall, [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def direct(rows: list[dict], server: ComfyUI, folder: Path, out: Path) -> tuple[float, float]:
    """Sequential jobs through the queue API without the runner: what a hand-written script does."""
    from sonic.jobs.jobsfile import load_jobs

    client = ComfyServer(server.url)
    workflow = Workflow.load(None)
    schema = client.object_info()
    jobs_file = folder / "direct.jsonl"
    jobs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.mkdir()
    started, running = time.perf_counter(), 0.0
    for job in load_jobs(jobs_file, workflow, schema):
        image = client.upload(Path(job.image.location), Path(job.image.location).name, "direct")
        audio = client.upload(Path(job.audio.location), Path(job.audio.location).name, "direct")
        outcome = client.run(workflow.bind(job, (image, ""), (audio, ""), f"direct/{job.id}", schema))
        entry = outcome.history["outputs"][workflow.encoder]["images"][0]
        client.download(entry, out / f"{job.id}.mp4")
        running += execution_seconds(outcome.history)
    return time.perf_counter() - started, running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--overhead-only", action="store_true", help="skip the throughput runs")
    parser.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference" / "sonic-tiny")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_DIR"):
        sys.exit("set COMFYUI_DIR (../shared/comfyui/install.sh DEST prints it)")
    top = Path(tempfile.mkdtemp(prefix="sonic-batch-bench-"))
    for name in ("portrait.png", "speech.wav"):
        shutil.copy(args.reference / "inputs" / name, top / name)

    def rows(seed0: int) -> list[dict]:
        return [{"id": f"j{n}", "image": "portrait.png", "audio": "speech.wav", "seed": seed0 + n,
                 "steps": args.steps, "min_resolution": 128, "duration": 1.0} for n in range(args.jobs)]

    def jobs_file(name: str, seed0: int) -> Path:
        path = top / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(seed0)))
        return path

    def stop(servers: list[ComfyUI]) -> None:
        for server in servers:
            server.stop()

    def start(*specs) -> list[ComfyUI]:
        servers = [ComfyUI(top / f"server-{time.monotonic_ns()}-{i}", args.reference, threads=threads).start()
                   for i, threads in enumerate(specs)]
        for server in servers:
            server.wait()
        warm = jobs_file(f"warm-{time.monotonic_ns()}", 10_000)
        batch(warm, servers, top / f"warm-out-{time.monotonic_ns()}")  # models loaded on every server
        return servers

    results = {"jobs": args.jobs, "steps": args.steps, "cpu_count": os.cpu_count()}
    servers = start(None)
    try:  # 1. overhead: the same server, direct script then the batch runner
        results["direct_s"], direct_running = direct(rows(1000), servers[0], top, top / "direct-out")
        wall, records = batch(jobs_file("one", 2000), servers, top / "one-out")
        results["batch_1_server_all_cores_s"] = wall
        # wall time outside ComfyUI's execution, per job: what each client adds (the batch: process start,
        # checks, uploads, submission, downloads, manifest; the direct script: uploads, submission, downloads)
        batch_running = sum(r["timings"]["running"] for r in records)
        results["direct_outside_execution_per_job_s"] = (results["direct_s"] - direct_running) / args.jobs
        results["batch_outside_execution_per_job_s"] = (wall - batch_running) / args.jobs
        own = [r["timings"]["inputs"] + r["timings"]["output"] for r in records]
        results["per_job_own_s"] = sum(own) / len(own)
        results["per_job_running_s"] = batch_running / len(records)
        results["overhead_pct"] = 100 * results["per_job_own_s"] / results["per_job_running_s"]
    finally:
        stop(servers)
    if not args.overhead_only:  # 2. throughput: one thread per server so that two servers share the cores fairly
        for name, threads in (("batch_1_server_1_thread_s", (1,)), ("batch_2_servers_1_thread_each_s", (1, 1))):
            servers = start(*threads)
            try:
                wall, records = batch(jobs_file(name, 3000 + 1000 * len(threads)), servers, top / f"{name}-out")
                results[name] = wall
                results[f"{name}_jobs_per_server"] = sorted(sum(r["server"] == s.url for r in records) for s in servers)
            finally:
                stop(servers)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_throughput.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
