"""One job on one ComfyUI server, and the worker process around it (`python -m sonic worker`).

A job may be delivered more than once (a worker killed mid-job, a broker restart, a visibility timeout that ran
out), so running it is idempotent: its output key and record key derive from the batch and the job id, and a job
whose record says done (with an output of that sha256) or failed is not run again; an output stored by a worker
that died before writing the record is adopted, not made again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..exits import EXIT_OK
from ..jobs.comfy_api import ComfyServer, Outcome, PromptRejected, ServerUnreachable
from ..jobs.jobsfile import Job, Workflow
from ..jobs.manifest import make_record, timings
from ..jobs.storage import INPUT_URL_EXPIRY_S, S3
from .queue import QUEUE, TASK, make_app
from .store import BatchStore

log = logging.getLogger("sonic.fleet")
WATCH_S = 5.0  # how often a worker asks its ComfyUI whether it answers


class Worker:
    """What one worker process serves: one ComfyUI server, the store, its name in the fleet."""

    def __init__(self, comfyui: str, s3: S3, name: str, job_timeout_s: float = 0.0):
        self.server, self.s3, self.name, self.job_timeout_s = ComfyServer(comfyui), s3, name, job_timeout_s
        self.app = None
        self.consuming = True
        self.lock = threading.Lock()

    # -- ComfyUI down: stop taking jobs, say so, take them again when it is back --------------------------------
    def set_consuming(self, wanted: bool, reason: str = "") -> None:
        with self.lock:
            if wanted == self.consuming or self.app is None:
                return
            self.consuming = wanted
        if wanted:
            log.warning("ComfyUI at %s answers again: %s takes jobs", self.server.url, self.name)
            self.app.control.add_consumer(QUEUE, destination=[self.name])
        else:
            log.warning("ComfyUI at %s is not answering (%s): %s takes no jobs until it is back",
                        self.server.url, reason, self.name)
            self.app.control.cancel_consumer(QUEUE, destination=[self.name])

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(WATCH_S):
            alive = self.server.alive()
            self.set_consuming(alive, "" if alive else "health check failed")

    # -- one job -----------------------------------------------------------------------------------------------
    def run_safely(self, task, message: dict) -> dict:
        """`run`, where anything unexpected (the store briefly unreachable, ComfyUI gone while its output is
        fetched) is a transient failure: retried, then recorded. A task that raised would be acknowledged as
        failed by Celery with no record: the job would be lost."""
        from celery.exceptions import Reject, Retry

        try:
            return self.run(task, message)
        except (Retry, Reject):
            raise
        except Exception as exc:  # noqa: BLE001 (recorded below)
            error = f"{type(exc).__name__}: {exc}"
            self.retry_if_allowed(task, message, error)
            job = Job.from_message(message["job"])
            record = make_record(job, "failed", server=self.server.url, worker=self.name,
                                 attempts=task.request.retries + 1, error=f"{error} (gave up after retries)")
            BatchStore(self.s3, message["batch"]).write_record(record)  # if this fails too, the broker keeps the job
            return record

    @staticmethod
    def retry_if_allowed(task, message: dict, error: str) -> None:
        """Raise Celery's Retry (backoff 5 s, doubling, at most 300 s) while the job has retries left."""
        retries = int(message.get("retries", 2))
        if task.request.retries < retries:
            delay = min(float(message.get("backoff_s", 5.0)) * 2 ** task.request.retries, 300.0)
            log.warning("job %s: %s; retrying in %g s", message["job"]["id"], error, delay)
            raise task.retry(countdown=delay, max_retries=retries)

    def run(self, task, message: dict) -> dict:
        """The Celery task body. Returns the job's record; raises Retry (transient) or Reject (ComfyUI down)."""
        from celery.exceptions import Reject

        job = Job.from_message(message["job"])
        store = BatchStore(self.s3, message["batch"], message.get("url_expiry", 7200))
        final = store.finished(job)
        if final is not None:
            log.info("job %s of %s already %s: skipped", job.id, message["batch"], final["status"])
            return final
        attempt, started = task.request.retries + 1, time.monotonic()
        # visible to `status` (a solo-pool worker cannot answer Celery's inspect while it runs a job); replaced by
        # the final record, or stale when this worker dies, until the job is delivered again
        store.write_record(make_record(job, "running", server=self.server.url, worker=self.name, attempts=attempt))
        workflow = Workflow(Path(message.get("workflow_name", "workflow.json")), message["workflow"],
                            message.get("workflow_digest", ""))

        def failed(error: str, prompt_id: str | None = None) -> dict:
            record = make_record(job, "failed", server=self.server.url, worker=self.name, prompt_id=prompt_id,
                                 attempts=attempt, seconds=round(time.monotonic() - started, 2), error=error)
            store.write_record(record)
            return record

        sources = []
        for source in (job.image, job.audio):
            if source.kind == "url":
                sources.append(("", source.location))
            elif source.kind == "s3":
                sources.append(("", self.s3.presign(source.location, INPUT_URL_EXPIRY_S)))
            else:  # never a path on the worker's disk
                return failed(f"{source.location!r}: a fleet job's inputs must be http(s):// or s3:// URLs")
        prompt = workflow.bind(job, sources[0], sources[1], f"sonic-fleet/{job.id}", message["schema"])
        inputs_done = time.monotonic()
        try:
            outcome = self.server.run(prompt, timeout_s=self.job_timeout_s or None)
        except PromptRejected as exc:
            return failed(f"rejected by {self.server.url}: {exc}")
        except ServerUnreachable as exc:  # not the job's fault: hand it back, stop taking jobs
            self.set_consuming(False, str(exc))
            raise Reject(str(exc), requeue=True) from None
        comfyui_done = time.monotonic()
        if outcome.status == "success":
            return self._store(job, store, workflow, outcome, attempt, (started, inputs_done, comfyui_done))
        if outcome.status == "lost":
            self.set_consuming(self.server.alive(), outcome.error)
        if outcome.transient:
            self.retry_if_allowed(task, message, outcome.error)
        suffix = f" (gave up after {attempt} attempts)" if outcome.transient else ""
        return failed(outcome.error + suffix, outcome.prompt_id or None)

    def _store(self, job: Job, store: BatchStore, workflow: Workflow, outcome: Outcome, attempt: int,
               stamps: tuple[float, float, float]) -> dict:
        temp = store.outputs.temp_file(job.id)
        try:
            sha256, size = self.server.download(workflow.video_entry(outcome.history), temp)
            output, url = store.outputs.store(temp, job.id, job.metadata(sha256, outcome.prompt_id))
        finally:
            temp.unlink(missing_ok=True)
        record = make_record(job, "done", output=output, url=url, sha256=sha256, bytes=size, server=self.server.url,
                             worker=self.name, prompt_id=outcome.prompt_id, attempts=attempt,
                             seconds=round(time.monotonic() - stamps[0], 2), timings=timings(*stamps, outcome.history),
                             **workflow.lipsync(outcome.history))
        store.write_record(record)  # then Celery acknowledges the message (late acknowledgement)
        return record


def serve(broker: str, comfyui: str, concurrency: int = 1, name: str | None = None, s3_endpoint: str | None = None,
          s3_addressing: str = "auto", job_timeout_s: float = 0.0) -> int:
    """Run a worker until SIGTERM/Ctrl-C (warm shutdown: the running job finishes first)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    port = comfyui.rstrip("/").rsplit(":", 1)[-1]
    name = name or f"sonic-{port if port.isdigit() else 'comfyui'}-{os.getpid()}@{socket.gethostname()}"
    worker = Worker(comfyui, S3(s3_endpoint, s3_addressing), name, job_timeout_s)
    if not worker.server.alive():
        log.warning("ComfyUI at %s is not answering yet; jobs wait in the queue until it does", comfyui)
    app = make_app(broker)
    worker.app = app

    @app.task(name=TASK, bind=True, acks_late=True)
    def run_job(task, message):
        record = worker.run_safely(task, message)  # the whole record is in the store; the log gets no links
        return {key: record.get(key) for key in ("id", "status", "output", "error")}

    stop = threading.Event()
    watcher = threading.Thread(target=worker.watch, args=(stop,), daemon=True, name="sonic-comfyui-watch")

    from celery.signals import worker_ready

    @worker_ready.connect(weak=False)
    def _ready(**_):
        watcher.start()
        worker.set_consuming(worker.server.alive(), "not answering at start")

    argv = ["worker", "--pool", "solo" if concurrency == 1 else "threads", "--concurrency", str(concurrency),
            "--queues", QUEUE, "--hostname", name, "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
    return EXIT_OK
