"""The job database at scale, nothing run: `status` and the reconciler over 100,000 synthetic jobs, and the
database's own cost per job (claim, heartbeat, prompt id, stage, finish).

    python benchmarks/fleet_status.py [--database URL] [--jobs 100000] [--out benchmarks/results/fleet_status.json]

Default database: a SQLite file in a temporary folder. For PostgreSQL give a URL of an empty database.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sonic.jobdb import JobDB  # noqa: E402


def timed(action, repeat: int = 5) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder = tempfile.TemporaryDirectory()
    url = args.database or f"sqlite:///{folder.name}/jobs.db"
    db = JobDB(url)
    db.upgrade()
    batch = {"name": "bench", "uri": "s3://bench/renders/bench", "workflow": {}, "workflow_name": "w.json",
             "workflow_digest": "d" * 64, "schema": {}, "retries": 2, "backoff_s": 5.0, "url_expiry_s": 7200}
    rows = [{"name": f"job{n:06d}", "key": f"{n:032x}", "spec": {"id": f"job{n:06d}", "params": {"seed": n}},
             "image_key": f"s3://bench/in/{n}.png", "image_sha256": "a" * 64, "audio_key": f"s3://bench/in/{n}.wav",
             "audio_sha256": "b" * 64} for n in range(args.jobs)]
    start = time.perf_counter()
    batch_id, _ = db.create_batch(batch, rows)
    submit_s = time.perf_counter() - start
    ids = [row["id"] for row in db.job_rows(batch_id)]
    start = time.perf_counter()
    db.rang(ids)
    rang_s = time.perf_counter() - start
    # the database's own cost of one job's life: claim, a heartbeat, the prompt id, stage, finish
    sample = ids[: min(2000, len(ids))]
    start = time.perf_counter()
    for n, job_id in enumerate(sample):
        claim = db.claim(job_id, f"w{n % 8}", "http://gpu:8188", 60.0)
        db.heartbeat(job_id, claim.token, 60.0)
        db.note_prompt(job_id, claim.token, f"p{n}")
        db.stage(job_id, claim.token, f"s3://bench/renders/bench/attempts/{n}.mp4", "c" * 64, 1000)
        if n % 10 == 9:
            db.finish(job_id, claim.token, "failed", error="NoFaceError: no face")
        else:
            db.finish(job_id, claim.token, "done", output_key=f"s3://bench/renders/bench/{n}.mp4", sha256="c" * 64,
                      bytes=1000)
    per_job_ms = (time.perf_counter() - start) / len(sample) * 1000
    for n, job_id in enumerate(ids[len(sample): len(sample) + 64]):  # some running
        db.claim(job_id, f"w{n % 8}", "http://gpu:8188", 60.0)

    def refresh():
        db.counts(batch_id)
        db.by_worker(batch_id)
        db.failed(batch_id)

    def reconcile_round():
        db.try_lock("reconciler", "bench", 20.0)
        db.expire_leases()
        db.due()
        db.silent(60.0, 5000)

    result = {
        "database": db.dialect, "jobs": args.jobs, "submit_transaction_s": round(submit_s, 2),
        "mark_rung_s": round(rang_s, 2), "job_lifecycle_ms_per_job": round(per_job_ms, 2),
        "status_refresh": timed(refresh), "reconciler_round": timed(reconcile_round),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": "counts, per-worker counts and failed jobs with reasons (one refresh of `status`); a reconciler "
                "round (lock, lapsed leases, due jobs, silent jobs); rss includes building the synthetic rows",
    }
    db.close()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
