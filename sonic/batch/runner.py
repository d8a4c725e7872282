"""The batch scheduler: jobs spread over ComfyUI servers, retried, resumed, recorded.

Each server's queue is kept shallow (its running job plus one waiting), so a slow or dead server never hoards
work, and a new job goes to the least loaded server. Every attempt runs in a thread of its own: inputs to the
server (uploaded once per content per server; s3:// objects downloaded here with the store's credentials and
uploaded the same way, so no presigned link or key id enters a prompt; URLs as they are), the prompt followed on
the websocket, the MP4 fetched through /view and stored. The main thread alone decides: retries with backoff on
another server for transient failures (server gone or restarted, out of memory), none for a job's own bad input;
it writes the manifest, shows progress, and on Ctrl-C takes this batch's prompts out of the servers' queues.
"""

from __future__ import annotations

import json
import queue
import signal
import sys
import tempfile
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..exits import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from ..jobs.comfy_api import ComfyServer, Outcome, PromptRejected, ServerUnreachable
from ..jobs.jobsfile import Job, JobsError, Workflow, load_jobs
from ..jobs.manifest import Manifest, make_record, timings
from ..jobs.storage import S3, LocalOutputs, S3Outputs

DEPTH = 2  # prompts of ours per server: the running one and one waiting
PROBE_S = 5.0  # how often a server that stopped answering is asked again
UPLOAD_SUBFOLDER = "sonic-batch"


@dataclass
class Settings:
    jobs: Path
    servers: list[str]
    out: str
    workflow: Path | None = None
    retries: int = 2
    manifest: str | None = None
    json: bool = False
    retry_failed: bool = False
    url_expiry_s: int = 7200
    s3_endpoint: str | None = None
    s3_addressing: str = "auto"
    backoff_s: float = 5.0
    job_timeout_s: float = 0.0
    give_up_s: float = 60.0
    check: bool = False


@dataclass
class Lane:
    """One server as the scheduler sees it."""

    server: ComfyServer
    up: bool = True
    ours: int = 0  # prompts of this batch queued or running there
    next_probe: float = 0.0
    last_used: float = 0.0
    uploads: dict = field(default_factory=dict)  # input sha256, and s3:// URI, -> name in the server's input folder
    upload_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Task:
    job: Job
    attempts: int = 0
    started: float = 0.0
    not_before: float = 0.0
    avoid: set = field(default_factory=set)  # servers that failed it
    lane: Lane | None = None
    prompt_id: str = ""
    progress: str = ""
    timings: dict = field(default_factory=dict)  # monotonic times of the current attempt's steps


class Events:
    """What the user sees: a tqdm bar and readable lines, or with --json one JSON event per line on stdout."""

    def __init__(self, as_json: bool):
        self.as_json, self.bar = as_json, None
        self.done = self.failed = 0
        self.shown_at = 0.0

    def start(self, total: int) -> None:
        if not self.as_json and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="job", desc="batch", file=sys.stderr, dynamic_ncols=True)

    def emit(self, event: str, **data) -> None:
        if self.as_json:
            print(json.dumps({"event": event, **data}), flush=True)
        elif event in ("failed", "retry", "server_down", "server_up", "note"):
            text = {"failed": "failed {id}: {error}", "retry": "retrying {id} in {delay_s:g} s: {error}",
                    "server_down": "server {server} is not answering ({error}); its jobs go elsewhere",
                    "server_up": "server {server} answers again", "note": "{message}"}[event].format(**data)
            self.write(text)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def finished(self, ok: bool) -> None:
        self.done += ok
        self.failed += not ok
        if self.bar is not None:
            self.bar.set_postfix_str(f"done {self.done} failed {self.failed}", refresh=False)
            self.bar.update(1)

    def running(self, tasks) -> None:
        if self.bar is not None and time.monotonic() - self.shown_at > 0.5:
            self.shown_at = time.monotonic()
            shown = " ".join(f"{t.job.id}{t.progress}" for t in tasks)
            self.bar.set_postfix_str(f"done {self.done} failed {self.failed} | {shown}"[:120])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Batch:
    def __init__(self, settings: Settings, events: Events):
        self.settings, self.events = settings, events
        self.messages: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.threads: list[threading.Thread] = []
        self._s3 = None

    # -- 1. everything checked before anything is submitted ----------------------------------------------------
    def prepare(self) -> list[Job]:
        s = self.settings
        if s.retries < 0:
            raise ValueError(f"--retries must be 0 or more, got {s.retries}")
        if not s.servers:
            raise ValueError("give at least one --server URL (a ComfyUI server with this pack installed)")
        self.workflow = Workflow.load(s.workflow)
        self.lanes = [Lane(ComfyServer(url)) for url in dict.fromkeys(s.servers)]
        self.schema = self._schema()
        self.outputs = (S3Outputs(self.s3, s.out, s.url_expiry_s) if s.out.startswith("s3://")
                        else LocalOutputs(Path(s.out)))
        if isinstance(self.outputs, LocalOutputs):
            self._lock_folder(self.outputs.folder)
        location = s.manifest or self.outputs.manifest_location
        self.manifest = Manifest(location, self.s3 if location.startswith("s3://") else None)
        jobs = load_jobs(Path(s.jobs), self.workflow, self.schema)
        return self._plan(jobs)

    @property
    def s3(self) -> S3:
        if self._s3 is None:
            self._s3 = S3(self.settings.s3_endpoint, self.settings.s3_addressing)
        return self._s3

    def _schema(self) -> dict:
        """Node definitions from the servers (/object_info). A server without the workflow's nodes is left out."""
        needed, schema, problems, usable = self.workflow.class_types(), None, [], []
        for lane in self.lanes:
            try:
                info = lane.server.object_info()
            except (ServerUnreachable, urllib.error.HTTPError, ValueError) as exc:
                lane.up = False  # asked again while the batch runs
                problems.append(f"{lane.url}: not answering ({exc})")
                usable.append(lane)
                continue
            missing = sorted(needed - set(info))
            if missing:
                problems.append(f"{lane.url}: lacks nodes {', '.join(missing)} (is the Sonic pack installed there?)")
                continue
            schema = schema or info
            usable.append(lane)
        if schema is None:
            raise ValueError("no --server can run the workflow: " + "; ".join(problems))
        for problem in problems:
            self.events.emit("note", message=f"server {problem}")
        self.lanes = usable
        return schema

    def _lock_folder(self, folder: Path) -> None:
        self._lock_file = open(folder / ".sonic-batch.lock", "w")  # held until the process ends
        try:
            if fcntl is not None:  # POSIX; on Windows two batches on one folder are not prevented
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"another batch is writing to {folder}; wait for it or use another --out") from None
        for stale in folder.glob(".*.part"):  # a temporary file left by a batch that was killed
            stale.unlink(missing_ok=True)

    def _plan(self, jobs: list[Job]) -> list[Job]:
        """Resume: what the manifest and the outputs say is finished is not run again."""
        todo, problems = [], []
        self.skipped_done = self.skipped_failed = 0
        for job in jobs:
            last = self.manifest.latest.get(job.id)
            if last is not None and last.get("key") != job.key:
                if last.get("status") == "done":
                    problems.append(f"job {job.id}: its output was made from other inputs, parameters or workflow; "
                                    "give the changed job a new id (or delete its output and manifest lines)")
                    continue
                todo.append(job)  # a failed job that was changed is a new job
            elif last is not None and last.get("status") == "done":
                existing = self.outputs.existing(job.id)
                if existing and existing["sha256"] == last.get("sha256"):
                    self.skipped_done += 1
                    self.events.emit("skipped", id=job.id, status="done", output=last.get("output"))
                else:
                    todo.append(job)  # recorded but missing or altered: made again
            elif last is not None and not self.settings.retry_failed:
                self.skipped_failed += 1
                self.events.emit("skipped", id=job.id, status="failed", error=last.get("error"))
            else:
                existing = self.outputs.existing(job.id) if last is None else None
                if existing is None:
                    todo.append(job)
                elif existing["metadata"].get("sonic-job-key") == job.key:  # stored, then the runner died
                    self.manifest.append(make_record(job, "done", output=self.outputs.location(job.id),
                                                      sha256=existing["sha256"], bytes=existing["bytes"],
                                                      prompt_id=existing["metadata"].get("sonic-prompt-id", ""),
                                                      recovered=True))
                    self.skipped_done += 1
                else:
                    problems.append(f"job {job.id}: {self.outputs.location(job.id)} exists but this batch's manifest "
                                    f"({self.manifest.location}) has no record of it; move it away or use another --out")
        if problems:
            raise JobsError(problems)
        return todo

    # -- 2. one attempt of one job on one server (a thread) ----------------------------------------------------
    def _input(self, source, lane: Lane) -> tuple[str, str]:
        """-> (upload name, URL) for a loader."""
        if source.kind == "url":
            return "", source.location
        if source.kind == "s3":
            return self._s3_input(source, lane), ""
        with lane.upload_lock:
            name = lane.uploads.get(source.sha256)
            if name is None:
                name = lane.server.upload(Path(source.location), f"{source.sha256[:24]}{source.suffix}", UPLOAD_SUBFOLDER)
                lane.uploads[source.sha256] = name
        return name, ""

    def _s3_input(self, source, lane: Lane) -> str:
        """An s3:// input downloaded with the store's credentials (into a temporary folder, removed once uploaded)
        and uploaded like a local file: once per object and per content per server."""
        with lane.upload_lock:
            name = lane.uploads.get(source.location)
            if name is None:
                with tempfile.TemporaryDirectory(prefix="sonic-batch-input-") as folder:
                    path = Path(folder) / f"input{source.suffix}"
                    try:
                        sha256, _ = self.s3.download(source.location, path)
                    except Exception as exc:  # no such object (FileNotFoundError), no access: the job's own input
                        if _unreachable(exc):  # the store did not answer: transient, retried
                            raise OSError(f"downloading {source.location}: {exc}") from exc
                        raise
                    name = lane.uploads.get(sha256)  # the same bytes as a local file or another object
                    if name is None:
                        name = lane.server.upload(path, f"{sha256[:24]}{source.suffix}", UPLOAD_SUBFOLDER)
                        lane.uploads[sha256] = name
                lane.uploads[source.location] = name
        return name

    def _attempt(self, task: Task, lane: Lane) -> None:
        job, post = task.job, self.messages.put
        task.timings = {"start": time.monotonic()}
        try:
            prompt = self.workflow.bind(job, self._input(job.image, lane), self._input(job.audio, lane),
                                        f"{UPLOAD_SUBFOLDER}/{job.id}", self.schema)
            task.timings["inputs"] = time.monotonic()
            outcome = lane.server.run(
                prompt, on_queued=lambda pid: post(("queued", task, pid)),
                on_progress=lambda data: post(("progress", task, data)), cancel=self.cancel,
                timeout_s=self.settings.job_timeout_s or None)
        except PromptRejected as exc:
            outcome = Outcome("error", "", error=f"rejected by {lane.url}: {exc}")
        except ServerUnreachable as exc:
            outcome = Outcome("lost", "", error=str(exc), transient=True)
        except FileNotFoundError as exc:  # an input that is gone (an s3:// object, a file deleted since the check)
            outcome = Outcome("error", "", error=f"input not found: {exc}")
        except (OSError, urllib.error.HTTPError) as exc:
            outcome = Outcome("error", "", error=f"{type(exc).__name__}: {exc}", transient=True)
        except Exception as exc:  # noqa: BLE001 (reported as this job's failure; the batch goes on)
            outcome = Outcome("error", "", error=f"{type(exc).__name__}: {exc}")
        task.timings["comfyui"] = time.monotonic()
        post(("released", task, outcome))
        if outcome.status == "success":
            try:
                post(("stored", task, self._store(task, lane, outcome)))
            except Exception as exc:  # noqa: BLE001
                post(("store_failed", task, f"storing the output failed: {type(exc).__name__}: {exc}"))

    def _store(self, task: Task, lane: Lane, outcome: Outcome) -> dict:
        job, outputs = task.job, self.outputs
        entry = self.workflow.video_entry(outcome.history)
        temp = outputs.temp_file(job.id)
        try:
            sha256, size = lane.server.download(entry, temp)
            record = make_record(job, "done", output=outputs.location(job.id), sha256=sha256, bytes=size,
                                  server=lane.url, prompt_id=outcome.prompt_id, attempts=task.attempts,
                                  seconds=round(time.monotonic() - task.started, 2),
                                  **self.workflow.lipsync(outcome.history))
            metadata = job.metadata(sha256, outcome.prompt_id)
            if isinstance(outputs, LocalOutputs):  # record first: a crash before the rename leaves a job to redo,
                record["timings"] = timings(task.timings["start"], task.timings["inputs"], task.timings["comfyui"], outcome.history)  # never an output without its record
                self.manifest.append(record)
                outputs.store(temp, job.id, metadata)
            else:
                record["output"], record["url"] = outputs.store(temp, job.id, metadata)
                record["timings"] = timings(task.timings["start"], task.timings["inputs"], task.timings["comfyui"], outcome.history)
                self.manifest.append(record)
            return record
        finally:
            temp.unlink(missing_ok=True)

    # -- 3. the scheduler ---------------------------------------------------------------------------------------
    def execute(self, todo: list[Job]) -> int:
        s, events = self.settings, self.events
        pending = [Task(job) for job in todo]
        running: list[Task] = []
        storing = 0
        events.start(len(todo))
        all_down_since = None
        try:
            while pending or running or storing:
                now = time.monotonic()
                self._probe(now)
                if not any(lane.up for lane in self.lanes):
                    all_down_since = all_down_since or now
                    if now - all_down_since > s.give_up_s and not running and not storing:
                        events.write(f"every server has stopped answering ({', '.join(l.url for l in self.lanes)}) "
                                     f"for {s.give_up_s:g} s; {len(pending)} job(s) not run. Run the same command "
                                     "again to resume: finished jobs are kept.")
                        return EXIT_FAILED
                else:
                    all_down_since = None
                self._dispatch(pending, running, now)
                events.running(running)
                try:
                    message = self.messages.get(timeout=0.25)
                except queue.Empty:
                    continue
                kind, task, payload = message
                if kind == "queued":
                    task.prompt_id = payload
                    events.emit("queued", id=task.job.id, server=task.lane.url, prompt_id=payload, attempt=task.attempts)
                elif kind == "progress":
                    task.progress = f" {payload.get('value')}/{payload.get('max')}"
                    events.emit("progress", id=task.job.id, node=payload.get("node"), value=payload.get("value"),
                                max=payload.get("max"), server=task.lane.url)
                elif kind == "released":
                    running.remove(task)
                    task.lane.ours -= 1
                    if payload.status == "success":
                        storing += 1
                    else:
                        self._failed_attempt(task, payload, pending)
                elif kind == "stored":
                    storing -= 1
                    events.emit("done", **payload)
                    events.finished(True)
                else:  # store_failed
                    storing -= 1
                    self._failed_attempt(task, Outcome("error", task.prompt_id, error=payload, transient=True), pending)
        except KeyboardInterrupt:
            return self._cancelled(running)
        finally:
            events.close()
        return EXIT_OK if events.failed == 0 and self.skipped_failed == 0 else EXIT_FAILED

    def _probe(self, now: float) -> None:
        for lane in self.lanes:
            if not lane.up and now >= lane.next_probe:
                lane.next_probe = now + PROBE_S
                if lane.server.alive():
                    lane.up = True
                    self.events.emit("server_up", server=lane.url)

    def _dispatch(self, pending: list[Task], running: list[Task], now: float) -> None:
        while not self.cancel.is_set():
            ready = [t for t in pending if t.not_before <= now]
            if not ready:
                return
            loads = {}
            for lane in self.lanes:
                if lane.up and lane.ours < DEPTH:
                    try:
                        loads[id(lane)] = lane.server.queue_remaining()  # other users' prompts count too
                    except (ServerUnreachable, urllib.error.HTTPError, ValueError, KeyError) as exc:
                        self._down(lane, str(exc))
            task = ready[0]
            lanes = [lane for lane in self.lanes if id(lane) in loads and loads[id(lane)] < DEPTH]
            preferred = [lane for lane in lanes if lane.url not in task.avoid] or lanes
            if not preferred:
                return
            lane = min(preferred, key=lambda l: (loads[id(l)], l.ours, l.last_used))
            pending.remove(task)
            running.append(task)
            task.lane, task.progress, task.prompt_id = lane, "", ""
            task.attempts += 1
            task.started = task.started or now
            lane.ours += 1
            lane.last_used = now
            thread = threading.Thread(target=self._attempt, args=(task, lane), daemon=True,
                                      name=f"sonic-batch-{task.job.id}")
            self.threads.append(thread)
            thread.start()

    def _down(self, lane: Lane, reason: str) -> None:
        if lane.up:
            lane.up, lane.next_probe = False, time.monotonic() + PROBE_S
            self.events.emit("server_down", server=lane.url, error=reason)

    def _failed_attempt(self, task: Task, outcome: Outcome, pending: list[Task]) -> None:
        s, job = self.settings, task.job
        if outcome.status == "cancelled":
            return
        if outcome.status == "lost":
            self._down(task.lane, outcome.error)
        if outcome.transient and task.attempts <= s.retries:
            delay = min(s.backoff_s * 2 ** (task.attempts - 1), 300.0)
            task.not_before, task.progress = time.monotonic() + delay, ""
            task.avoid.add(task.lane.url)
            pending.insert(0, task)
            self.events.emit("retry", id=job.id, error=outcome.error, attempt=task.attempts, delay_s=delay,
                             server=task.lane.url)
            return
        error = outcome.error + (f" (gave up after {task.attempts} attempts)" if outcome.transient else "")
        record = make_record(job, "failed", server=task.lane.url, prompt_id=outcome.prompt_id or None,
                              attempts=task.attempts, seconds=round(time.monotonic() - task.started, 2), error=error)
        self.manifest.append(record)
        self.events.emit("failed", **record)
        self.events.finished(False)

    def _cancelled(self, running: list[Task]) -> int:
        """Ctrl-C: our waiting prompts leave the queues, our running ones are interrupted (each attempt thread
        cancels its own prompt by id), outputs already made are stored and recorded."""
        self.cancel.set()
        self.events.write(f"cancelling: removing this batch's {len(running)} prompt(s) from the servers' queues ...")
        deadline = time.monotonic() + 60
        try:
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        while True:  # outputs that finished while cancelling are recorded by their threads; drain the rest
            try:
                self.messages.get_nowait()
            except queue.Empty:
                break
        self.events.emit("cancelled", manifest=self.manifest.location)
        self.events.write(f"cancelled; the manifest {self.manifest.location} records what finished. "
                          "Run the same command again to resume.")
        return EXIT_CANCELLED


def _unreachable(exc: Exception) -> bool:
    """A boto3 failure to reach the store (connection, timeout, retries spent), not an answer such as 403."""
    from boto3.exceptions import RetriesExceededError, S3TransferFailedError
    from botocore.exceptions import ConnectionError, HTTPClientError

    return isinstance(exc, (ConnectionError, HTTPClientError, RetriesExceededError, S3TransferFailedError))


def run(settings: Settings) -> int:
    """The whole batch; -> exit status (`sonic.exits`: all done, some failed, cancelled). A bad jobs file or
    setup raises before anything is submitted."""
    events = Events(settings.json)
    batch = Batch(settings, events)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        try:
            todo = batch.prepare()  # a bad jobs file or setup raises (JobsError, ValueError...): the CLI reports it
        except KeyboardInterrupt:
            events.write("cancelled before anything was submitted")
            return EXIT_CANCELLED
        events.emit("plan", jobs=len(todo) + batch.skipped_done + batch.skipped_failed, to_run=len(todo),
                    done_before=batch.skipped_done, failed_before=batch.skipped_failed,
                    servers=[lane.url for lane in batch.lanes if lane.up], manifest=batch.manifest.location)
        if not settings.json:
            events.write(f"{len(todo)} job(s) to run, {batch.skipped_done} already done, {batch.skipped_failed} "
                         f"failed before{' (--retry-failed reruns them)' if batch.skipped_failed else ''}; "
                         f"manifest: {batch.manifest.location}")
        if settings.check:
            return EXIT_OK
        status = batch.execute(todo)
        events.emit("summary", done=events.done, failed=events.failed, skipped=batch.skipped_done,
                    manifest=batch.manifest.location, exit=status)
        if not settings.json and status != EXIT_CANCELLED:
            events.write(f"{events.done} done, {events.failed} failed, {batch.skipped_done} done before; "
                         f"manifest: {batch.manifest.location}")
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM from a supervisor: cancel like Ctrl-C, leaving a resumable manifest
