"""The batch scheduler: jobs spread over ComfyUI servers, retried, resumed, recorded.

Each server's queue is kept shallow (its running job plus one waiting), so a slow or dead server never hoards
work, and a new job goes to the least loaded server. Every attempt runs in a thread of its own: inputs to the
server (uploaded once per content per server; s3:// objects downloaded here with the store's credentials and
uploaded the same way, so no presigned link or key id enters a prompt; URLs as they are), the prompt followed on
the websocket, the MP4 fetched through /view and stored. The main thread alone decides: retries with backoff on
another server for transient failures (server gone or restarted, out of memory), none for a job's own bad input;
it writes the manifest, shows progress, and on Ctrl-C takes this batch's prompts out of the servers' queues.

One batch at a time writes to a destination. A folder is locked with flock(2) on `.sonic-batch.lock` (the kernel
lets go when the process dies; the file names its owner). An s3:// prefix is locked with an object,
`<prefix>/.sonic-batch.lock`, naming its owner (host, pid, a random run id) and its lifetime (`LOCK_TTL_S`),
rewritten every quarter of that while the batch lives; its expiry is the object's LastModified plus the lifetime,
judged by the store's clock (its Date header), so the submitting machines' clocks do not matter. A second batch on
the prefix is refused while the lock is live and takes it over once it has expired (its batch is gone). Taking it
is a write, a pause of `LOCK_SETTLE_S`, and a read back compared byte for byte (the portable check: some stores,
rclone's among them, ignore conditional writes); the write is also conditional (If-None-Match: *, or If-Match the
expired lock's ETag), which makes taking it race-free on stores that honour it (AWS S3, MinIO), and is sent
plainly where a store refuses the condition. A batch that finds its lock gone or taken stops submitting.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from ..exits import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from ..jobs.comfy_api import ComfyServer, Outcome, PromptRejected, ServerUnreachable
from ..jobs.jobsfile import Job, JobsError, Workflow, load_jobs, read_rows
from ..jobs.manifest import Manifest, lipsync_fields, make_record, timings
from ..jobs.storage import MISSING, S3, LocalOutputs, S3Outputs, split_s3

DEPTH = 2  # prompts of ours per server: the running one and one waiting
PROBE_S = 5.0  # how often a server that stopped answering is asked again
UPLOAD_SUBFOLDER = "sonic-batch"
LOCK_NAME = ".sonic-batch.lock"
LOCK_TTL_S = 120.0  # an s3:// lock's lifetime; renewed every quarter of it while the batch runs
LOCK_SETTLE_S = 1.0  # between writing the lock and reading it back (another run's write lands in between)
# model files the workflow names, checked on each server (/models/<folder>): class_type -> (input, folder)
MODEL_INPUTS = {"SonicModelLoader": ("sonic_unet", "sonic"), "ImageOnlyCheckpointLoader": ("ckpt_name", "checkpoints"),
                "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"), "VAELoader": ("vae_name", "vae"),
                "CLIPVisionLoader": ("clip_name", "clip_vision")}


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
        self.manifest = self.lock = self._lock_file = None
        self.server_checks: list[dict] = []  # what --check says about each server
        self.skipped_events: list[dict] = []  # told after the plan
        self.writable = ""  # how the destination was found writable

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
            self.writable = f"writable (lock file {LOCK_NAME} written and locked)"
        else:
            self.lock = S3Lock(self.s3, f"{self.outputs.base}/{LOCK_NAME}")
            taken_over = self.lock.acquire()
            if taken_over:
                self.events.emit("note", message=f"took over the expired lock of {taken_over} on {s.out}")
            self.writable = f"writable (lock object {LOCK_NAME} written and read back)"
        location = s.manifest or self.outputs.manifest_location
        self.manifest = Manifest(location, self.s3 if location.startswith("s3://") else None)
        extra = value_problems(Path(s.jobs), self.workflow, self.schema)
        try:
            jobs = load_jobs(Path(s.jobs), self.workflow, self.schema)
        except JobsError as exc:
            raise JobsError(exc.problems + extra) from None
        if extra:
            raise JobsError(extra)
        return self._plan(jobs)

    def close(self) -> None:
        """The end of a run, however it ends: an s3:// manifest made whole, the destination's lock let go."""
        manifest, lock, self.lock = self.manifest, self.lock, None
        try:
            if manifest is not None and manifest.remote and manifest.pieces:
                manifest.close()
        except Exception as exc:  # noqa: BLE001 (the store went away at the end: nothing is lost)
            self.events.write(f"could not rewrite the manifest {manifest.location} ({type(exc).__name__}: {exc}); "
                              f"its lines are kept as pieces in {manifest.pieces_prefix}, which the next run reads")
        finally:
            if lock is not None:
                lock.release()
            if self._lock_file is not None:
                self._lock_file.close()  # lets go of the flock
                self._lock_file = None

    @property
    def s3(self) -> S3:
        if self._s3 is None:
            self._s3 = S3(self.settings.s3_endpoint, self.settings.s3_addressing)
        return self._s3

    def _schema(self) -> dict:
        """Node definitions from the servers (/object_info). A server without the workflow's nodes, or without a
        model file the workflow names, is left out."""
        needed, schema, problems, usable = self.workflow.class_types(), None, [], []
        for lane in self.lanes:
            report = {"url": lane.url, "answers": False, "comfyui": None, "nodes": sorted(needed), "missing_nodes": [],
                      "models": [], "used": False, "problem": None}
            self.server_checks.append(report)
            try:
                info = lane.server.object_info()
            except (ServerUnreachable, urllib.error.HTTPError, ValueError) as exc:
                lane.up = False  # asked again while the batch runs
                report.update(problem=f"not answering ({exc})", error=str(exc), used=True)  # used once it answers
                problems.append(f"{lane.url}: {report['problem']}")
                usable.append(lane)
                continue
            report["answers"] = True
            if self.settings.check:
                with contextlib.suppress(Exception):  # only shown
                    report["comfyui"] = lane.server.get_json("/system_stats")["system"]["comfyui_version"]
            missing = sorted(needed - set(info))
            report["missing_nodes"] = missing
            if missing:
                report["problem"] = f"lacks nodes {', '.join(missing)} (is the Sonic pack installed there?)"
                problems.append(f"{lane.url}: {report['problem']}")
                continue
            report["models"] = self._models(lane)
            absent = [m for m in report["models"] if m["present"] is False and not m["downloaded"]]
            if absent:
                report["problem"] = "lacks model " + ", ".join(
                    f"{m['name']} in models/{m['folder']} (the workflow's {m['node']} {m['input']})" for m in absent)
                problems.append(f"{lane.url}: {report['problem']}")
                continue
            schema = schema or info
            report["used"] = True
            usable.append(lane)
        if schema is None:
            raise ValueError("no --server can run the workflow: " + "; ".join(problems))
        for problem in problems:
            self.events.emit("note", message=f"server {problem}")
        self.lanes = usable
        return schema

    def _models(self, lane: Lane) -> list[dict]:
        """The model files the workflow names, each looked up in the server's own list (/models/<folder>)."""
        found, listed = [], {}
        for node_id, node in self.workflow.prompt.items():
            if node["class_type"] not in MODEL_INPUTS:
                continue
            name_input, folder = MODEL_INPUTS[node["class_type"]]
            name = node["inputs"].get(name_input)
            if not isinstance(name, str):
                continue  # a link
            if folder not in listed:
                try:
                    listed[folder] = set(lane.server.get_json(f"/models/{folder}"))
                except (ServerUnreachable, urllib.error.HTTPError, ValueError, TypeError):
                    listed[folder] = None  # not listed (an older ComfyUI): not known, the prompt's validation says
            found.append({"node": f"{node['class_type']} (node {node_id})", "input": name_input, "name": name,
                          "folder": folder, "present": None if listed[folder] is None else name in listed[folder],
                          "downloaded": node["inputs"].get("download_missing") is True})
        return found

    def _lock_folder(self, folder: Path) -> None:
        """flock(2) on DEST/.sonic-batch.lock, held until the run ends (or its process dies); the file names its
        owner, which a refused batch shows."""
        self._lock_file = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (held to the end); not truncated before it is ours
        try:
            if fcntl is not None:  # POSIX; on Windows two batches on one folder are not prevented
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.seek(0)
            owner = _describe_owner(_json_or_empty(self._lock_file.read()))
            self._lock_file.close()
            self._lock_file = None
            raise ValueError(f"another batch is writing to {folder} ({owner}); wait for it to end or use another "
                             "--out (the lock goes with its process)") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(json.dumps(_owner()) + "\n")
        self._lock_file.flush()
        for stale in folder.glob(".*.part"):  # a temporary file left by a batch that was killed
            stale.unlink(missing_ok=True)

    def _plan(self, jobs: list[Job]) -> list[Job]:
        """Resume: what the manifest and the outputs say is finished is not run again. An output stored with this
        job's key whose record never made it to the manifest (the runner died in between) is recorded now, not
        made again. The `skipped` events wait in `skipped_events` (they follow the `plan` event)."""
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
                continue
            existing = self.outputs.existing(job.id)
            if last is not None and last.get("status") == "done" and existing \
                    and existing["sha256"] == last.get("sha256"):
                self.skipped_done += 1
                self._skipped(id=job.id, status="done", output=last.get("output"))
            elif existing and existing["sha256"] and existing["metadata"].get("sonic-job-key") == job.key:
                # stored (an s3:// object carries its job key and sha256), then the runner died before the record
                location = self.outputs.location(job.id)
                record = make_record(job, "done", output=location, sha256=existing["sha256"], bytes=existing["bytes"],
                                     prompt_id=existing["metadata"].get("sonic-prompt-id", ""), recovered=True,
                                     url=self.s3.presign(location, self.outputs.url_expiry_s)
                                     if isinstance(self.outputs, S3Outputs) else None)
                self.manifest.append(record)
                self.skipped_done += 1
                self._skipped(id=job.id, status="done", output=record["output"], recovered=True)
            elif last is not None and last.get("status") == "done":
                todo.append(job)  # recorded but missing or altered: made again
            elif last is not None and not self.settings.retry_failed:
                self.skipped_failed += 1
                self._skipped(id=job.id, status="failed", error=last.get("error"))
            elif existing is None or last is not None:
                todo.append(job)
            else:
                problems.append(f"job {job.id}: {self.outputs.location(job.id)} exists but this batch's manifest "
                                f"({self.manifest.location}) has no record of it; move it away or use another --out")
        if problems:
            raise JobsError(problems)
        return todo

    def _skipped(self, **data) -> None:
        self.skipped_events.append(data)

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
                                  **lipsync_fields(self.workflow, outcome.history))
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
                if self.lock is not None and self.lock.lost:
                    return self._stopped_for_lock(running)
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
        error = column_hints(outcome.error, self.workflow, self.schema)
        error += f" (gave up after {task.attempts} attempts)" if outcome.transient else ""
        record = make_record(job, "failed", server=task.lane.url, prompt_id=outcome.prompt_id or None,
                              attempts=task.attempts, seconds=round(time.monotonic() - task.started, 2), error=error)
        self.manifest.append(record)
        self.events.emit("failed", **record)
        self.events.finished(False)

    def _stopped_for_lock(self, running: list[Task]) -> int:
        """The s3:// lock was lost (taken by another batch after this one failed to renew it): stop as on Ctrl-C,
        so that two batches never write to one prefix."""
        self._let_go(running)
        self.events.emit("lock_lost", error=self.lock.lost, manifest=self.manifest.location)
        self.events.write(f"stopped: {self.lock.lost}; nothing more is submitted. The manifest "
                          f"{self.manifest.location} records what finished.")
        return EXIT_FAILED

    def _cancelled(self, running: list[Task]) -> int:
        """Ctrl-C: our waiting prompts leave the queues, our running ones are interrupted (each attempt thread
        cancels its own prompt by id), outputs already made are stored and recorded."""
        self._let_go(running)
        self.events.emit("cancelled", manifest=self.manifest.location)
        self.events.write(f"cancelled; the manifest {self.manifest.location} records what finished. "
                          "Run the same command again to resume.")
        return EXIT_CANCELLED

    def _let_go(self, running: list[Task]) -> None:
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

# -- what a batch user is told about a job's values: columns of the jobs file, not ComfyUI's widgets -------------
def is_face_box(text: str) -> bool:
    """The nodes' own rule (sonic.inputs.face.parse_face_box, which needs numpy): empty, or four numbers."""
    if not text.strip():
        return True
    try:
        return len([float(v) for v in text.replace(" ", "").split(",")]) == 4
    except ValueError:
        return False


def value_problems(path: Path, workflow: Workflow, schema: dict) -> list[str]:
    """Cells whose type ComfyUI cannot check (text read by the nodes themselves) checked here, before anything
    runs, worded as load_jobs words its problems. Today: face_box, four numbers x,y,w,h."""
    if not workflow.takers("face_box", schema):
        return []
    try:
        rows = read_rows(path)
    except (ValueError, FileNotFoundError):
        return []  # load_jobs says why
    problems = []
    for number, (line, row) in enumerate(rows, 1):
        value = row.get("face_box")
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, str) and is_face_box(value)):
            continue  # absent, fine, or not text at all (load_jobs says so)
        job_id = str(row.get("id", number)).strip()
        problems.append(f"{path.name} line {line} (id {job_id}): column face_box: {value!r} is not four numbers; "
                        "write x,y,w,h of the face in the photo's pixels (e.g. 120,80,200,240; in a CSV file inside "
                        "double quotes), or leave the cell empty to detect the face")
    return problems


# ComfyUI's error for a value a job set, as the nodes word it for a ComfyUI user -> what to change in the jobs file
WIDGET = re.compile(r"(?:Sonic [A-Z][\w-]*(?: [A-Z][\w-]*)*'s |the )(\w+) widget")  # "Sonic PreData's face_box widget"
NODE_INPUT = re.compile(r"Sonic [A-Z][\w-]*(?: [A-Z][\w-]*)*'s (\w+)(?= ['\"])")  # "Sonic PreData's face_box '1,2'"
REJECTED_INPUT = re.compile(r"(\(node [^)]*\): [^;]*?): (\w+)(?=;|$)")  # validation: "(node 5): Value ...: steps"
TOO_LONG = re.compile(r"duration ([\d.]+) s is longer than the audio \(([\d.]+) s\)")


def column_hints(error: str, workflow: Workflow, schema: dict) -> str:
    """A job's error with the per-job inputs it names said as jobs-file columns ("column face_box"), plus what to
    write there where the nodes' words do not say it."""
    if not error:
        return error
    columns = set(workflow.widget_inputs(schema))

    def as_column(template):
        return lambda m: template.format(m[1]) if m[1] in columns else m[0]

    text = WIDGET.sub(as_column("column {} of the jobs file"), error)
    text = NODE_INPUT.sub(as_column("column {}"), text)
    text = REJECTED_INPUT.sub(lambda m: f"{m[1]}: column {m[2]}" if m[2] in columns else m[0], text)
    too_long = TOO_LONG.search(text)
    if too_long and "duration" in columns:
        text += (f"; in the jobs file write at most {too_long[2]} in column duration (seconds), or 0 or an empty "
                 "cell for the whole audio")
    return text


# -- the destination's lock --------------------------------------------------------------------------------------
def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _json_or_empty(text) -> dict:
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe_owner(owner: dict) -> str:
    if not owner.get("host"):
        return "owner unknown"
    return f"host {owner['host']}, pid {owner.get('pid')}, run {str(owner.get('id', '?'))[:12]}, since {owner.get('since')}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LockState:
    """The lock object as read: its owner, when it expires and the store's time of reading (both by its clock)."""

    owner: dict
    body: bytes
    etag: str
    expires: datetime
    now: datetime

    @property
    def expired(self) -> bool:
        return self.now >= self.expires


class LockLost(Exception):
    pass


class S3Lock:
    """`<prefix>/.sonic-batch.lock`: one batch at a time on an s3:// prefix (see the module docstring)."""

    def __init__(self, s3: S3, uri: str, ttl_s: float = LOCK_TTL_S, settle_s: float = LOCK_SETTLE_S):
        self.s3, self.uri, self.ttl_s, self.settle_s = s3, uri, float(ttl_s), settle_s
        self.bucket, self.key = split_s3(uri)
        self.owner = _owner()
        self.lost: str | None = None  # why this batch no longer holds the lock
        self.valid_until = 0.0  # time.monotonic() until which our last write holds it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> LockState | None:
        from botocore.exceptions import ClientError

        try:
            reply = self.s3.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in MISSING:
                return None
            raise
        body = reply["Body"].read()
        owner = _json_or_empty(body)
        try:
            ttl = float(owner.get("ttl_s", LOCK_TTL_S))
        except (TypeError, ValueError):
            ttl = LOCK_TTL_S
        date = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        except (TypeError, ValueError):
            now = datetime.now(timezone.utc)
        return LockState(owner, body, reply.get("ETag", ""), reply["LastModified"] + timedelta(seconds=ttl), now)

    def held_message(self, state: LockState) -> str:
        left = max(0, int((state.expires - state.now).total_seconds() + 0.999))
        where = self.uri.rsplit("/", 1)[0]
        return (f"another batch is writing to {where} ({_describe_owner(state.owner)}); its lock {self.uri} "
                f"expires at {_iso(state.expires)} (in {left} s, by the store's clock) unless that batch renews it, "
                f"which it does every {state.owner.get('ttl_s', LOCK_TTL_S) / 4:g} s while it runs. Wait for it to "
                "end or use another --out. If that batch is gone (killed, its machine lost), its lock is taken over "
                "once it has expired, or delete the lock object to take over now")

    def acquire(self) -> str | None:
        """Take the lock, or ValueError naming the live owner. -> the owner of an expired lock taken over, or None."""
        state = self.read()
        if state is not None and state.owner.get("id") != self.owner["id"] and not state.expired:
            raise ValueError(self.held_message(state))
        condition = {"IfNoneMatch": "*"} if state is None else {"IfMatch": state.etag} if state.etag else {}
        try:
            body = self._write(condition)
        except LockLost:
            body = b""  # another batch's conditional write came first: read below who has it
        time.sleep(self.settle_s)
        check = self.read()
        if check is None or check.body != body:
            if check is not None and not check.expired:
                raise ValueError(self.held_message(check))
            raise ValueError(f"could not take the lock {self.uri}: another batch took or removed it at the same "
                             "moment; try again")
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="sonic-batch-lock")
        self._thread.start()
        return _describe_owner(state.owner) if state is not None else None

    def _write(self, condition: dict) -> bytes:
        """Write the lock (conditionally where the store honours it); -> the bytes written. LockLost when the
        store refused the condition (someone else wrote it first)."""
        from botocore.exceptions import ClientError, ParamValidationError

        body = json.dumps({**self.owner, "ttl_s": self.ttl_s,
                           "renewed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        started = time.monotonic()
        put = {"Bucket": self.bucket, "Key": self.key, "Body": body, "ContentType": "application/json"}
        try:
            self.s3.client.put_object(**put, **condition)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise LockLost(code) from None
            if not condition:
                raise
            self.s3.client.put_object(**put)  # a store that refuses conditional writes: the read-back decides
        except ParamValidationError:  # a botocore from before conditional writes
            self.s3.client.put_object(**put)
        self.valid_until = started + self.ttl_s
        return body

    def renew(self) -> None:
        """Once: still ours? then written again (a new LastModified: a new expiry). Sets `lost` when it is not."""
        state = self.read()
        if state is None or state.owner.get("id") != self.owner["id"]:
            self.lost = (f"the lock {self.uri} was " + ("removed" if state is None else
                         f"taken by another batch ({_describe_owner(state.owner)})"))
            return
        try:
            self._write({"IfMatch": state.etag} if state.etag else {})
        except LockLost:
            self.lost = f"the lock {self.uri} was taken by another batch"

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and not self.lost:
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 (the store did not answer: tried again until the lock expires)
                if time.monotonic() > self.valid_until:
                    self.lost = f"the lock {self.uri} could not be renewed before it expired ({exc})"

    def release(self) -> None:
        """Stop renewing; delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        with contextlib.suppress(Exception):  # an unreachable store: the lock expires by itself
            state = self.read()
            if state is not None and state.owner.get("id") == self.owner["id"]:
                self.s3.delete(self.uri)


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
        for skipped in batch.skipped_events:
            events.emit("skipped", **skipped)
        if not settings.json and not settings.check:
            events.write(f"{len(todo)} job(s) to run, {batch.skipped_done} already done, {batch.skipped_failed} "
                         f"failed before{' (--retry-failed reruns them)' if batch.skipped_failed else ''}; "
                         f"manifest: {batch.manifest.location}")
        if settings.check:
            report_check(batch, todo)
            return EXIT_OK
        status = batch.execute(todo)
        batch.close()  # before the summary: the manifest it names is whole
        events.emit("summary", done=events.done, failed=events.failed, skipped=batch.skipped_done,
                    manifest=batch.manifest.location, exit=status)
        if not settings.json and status != EXIT_CANCELLED:
            events.write(f"{events.done} done, {events.failed} failed, {batch.skipped_done} done before; "
                         f"manifest: {batch.manifest.location}")
        return status
    finally:
        try:
            batch.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def report_check(batch: Batch, todo: list[Job]) -> None:
    """--check: what was checked, as a `check` event (--json) or as lines on stdout."""
    s, workflow = batch.settings, batch.workflow
    total = len(todo) + batch.skipped_done + batch.skipped_failed
    report = {"jobs_file": str(s.jobs), "jobs": total, "to_run": len(todo), "done_before": batch.skipped_done,
              "failed_before": batch.skipped_failed,
              "workflow": {"path": str(workflow.path), "sha256": workflow.digest, "nodes": len(workflow.prompt),
                           "node_types": sorted(workflow.class_types())},
              "servers": batch.server_checks,
              "output": {"location": s.out, "writable": True, "how": batch.writable},
              "manifest": {"location": batch.manifest.location, "records": len(batch.manifest.latest)}}
    if s.json:
        batch.events.emit("check", **report)
        return
    lines = [(f"jobs: {total} in {s.jobs} (every row checked against the servers' node definitions): {len(todo)} "
              f"to run, {batch.skipped_done} done before, {batch.skipped_failed} failed before"),
             f"workflow: {workflow.path} sha256 {workflow.digest} ({len(workflow.prompt)} nodes)"]
    for server in batch.server_checks:
        if not server["answers"]:
            lines.append(f"server {server['url']}: NOT answering ({server['error']}); asked again every {PROBE_S:g} s "
                         "while the batch runs")
            continue
        version = f" (ComfyUI {server['comfyui']})" if server["comfyui"] else ""
        if server["missing_nodes"]:
            lines.append(f"server {server['url']}{version}: answers but lacks nodes "
                         f"{', '.join(server['missing_nodes'])}: not used")
            continue
        models = "; ".join(f"model {m['name']} " + ("present" if m["present"] else
                           "not listed by this server (unknown)" if m["present"] is None else
                           "missing (the workflow downloads it: download_missing)" if m["downloaded"] else "MISSING")
                           + f" in models/{m['folder']}" for m in server["models"])
        lines.append(f"server {server['url']}{version}: answers, has the workflow's {len(server['nodes'])} node "
                     f"types" + (f"; {models}" if models else "") + ("" if server["used"] else ": not used"))
    lines.append(f"output: {s.out} {batch.writable}")
    lines.append(f"manifest: {batch.manifest.location} ({len(batch.manifest.latest)} job(s) recorded)")
    lines.append("check passed; nothing was submitted")
    for line in lines:
        print(line, flush=True)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM from a supervisor: cancel like Ctrl-C, leaving a resumable manifest
