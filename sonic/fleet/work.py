"""One job on one ComfyUI server, and the worker process around it (`python -m sonic worker`).

A message only rings for a job id. The worker claims the job in the job database (a lease with a fencing token),
renews the lease while ComfyUI runs, and the database accepts the job's output and final state only from the
attempt that holds the token:

1. claim (refused: already done, running under another live lease, in backoff, unknown id -> nothing runs);
2. checks: the batch's location is under this worker's --out-prefix, its workflow uses allowed nodes only, and this
   ComfyUI has the nodes and models the workflow names (else the job goes back and the worker pauses, saying why);
3. inputs: `s3://` objects downloaded with the store's credentials and uploaded to ComfyUI as files (no link, key id
   or signature enters a prompt, an MP4 or ComfyUI's history); http(s) URLs as they are;
4. ComfyUI runs the prompt while a heartbeat renews the lease; a lost lease interrupts the prompt by its id;
5. the MP4 goes to an attempt's own key, the database records it (token-checked), it is copied to the job's key,
   then the job is done (token-checked). An output already staged by an earlier attempt is published, not made
   again; a failed upload is retried without running ComfyUI again.

Whose fault: the job's own bad input or graph fails it (transient ComfyUI errors are retried `--retries` times);
the store, the database, the broker, ComfyUI unreachable, or an operator's URL allow-list never fail a job: it goes
back to queued with a backoff and the worker stops taking jobs until the cause is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from ..exits import EXIT_OK
from ..jobdb.db import Claim, DatabaseUnavailable, JobDB
from ..jobs.comfy_api import ComfyServer, PromptRejected, ServerUnreachable
from ..jobs.jobsfile import Job, Workflow
from ..jobs.manifest import lipsync_fields, timings
from ..jobs.storage import S3
from .queue import QUEUE, TASK, make_app, ring, safe_url
from .store import BatchStore

log = logging.getLogger("sonic.fleet")
WATCH_S = 5.0  # how often a paused worker checks whether the cause is gone
UPLOAD_SUBFOLDER = "sonic-fleet"
URL_REFUSED_PAUSE_S = 300.0
REFUSED_RETRY_S = 300.0  # a batch this worker refuses waits this long before any worker tries it again
ERROR_PAUSE_S = 60.0  # after an error nobody recognised (a bug here, a broken GPU): a pause, then jobs again


def env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be seconds, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def lease_s() -> float:
    """SONIC_LEASE_SECONDS: how long a job stays with a worker that stopped renewing it (renewed every quarter)."""
    return env_seconds("SONIC_LEASE_SECONDS", 60.0)


STORE_OUTAGE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                      "InternalError", "AccessDenied", "ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                      "RequestTimeTooSkewed", "InvalidToken", "TokenRefreshRequired", "NoSuchBucket"}


def is_infrastructure(exc: BaseException) -> bool:
    """An error that says something is down, unreachable or misconfigured, not that the job is bad: the database,
    ComfyUI, the network, or the store (its connection errors, credentials, throttling, 5xx answers, refusals). A
    missing input object is the job's own (FileNotFoundError, raised by the store's download)."""
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, (DatabaseUnavailable, ServerUnreachable, ConnectionError, TimeoutError)):
        return True
    try:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import CredentialRetrievalError
    except ImportError:
        return False
    if isinstance(exc, (BotoConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError,
                        CredentialRetrievalError, S3UploadFailedError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 403 or error.get("Code") in STORE_OUTAGE_CODES
    return False


def comfyui_cannot_run(object_info: dict, prompt: dict) -> list[str]:
    """What this ComfyUI lacks to run `prompt`: node types, or choices (model files) the prompt names. The
    loaders' file choices are not checked: their inputs are uploaded."""
    problems = []
    for node in prompt.values():
        class_type = node.get("class_type")
        info = object_info.get(class_type)
        if info is None:
            problems.append(f"node {class_type} is not installed")
            continue
        specs = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            spec = specs.get(name)
            if not spec or isinstance(value, list) or (class_type, name) in (("SonicLoadImage", "image"),
                                                                             ("SonicLoadAudio", "audio")):
                continue
            choices = spec[0] if isinstance(spec[0], list) else (
                spec[1].get("options") if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) else None)
            if choices is not None and value not in choices:
                problems.append(f"{class_type}.{name} = {value!r} is not on this ComfyUI (it has: "
                                f"{', '.join(map(str, choices[:6])) or 'nothing'})")
    return problems


def pack_nodes() -> set[str]:
    import json

    from .batches import SCHEMA_SNAPSHOT

    return set(json.loads(SCHEMA_SNAPSHOT.read_text()))


class Unavailable(ConnectionError):
    """Something the job needs did not answer; `cause` names which (store, comfyui, database)."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class Worker:
    """What one worker process serves: one ComfyUI server, the store, the job database, its name in the fleet."""

    def __init__(self, comfyui: str, s3: S3, db: JobDB, name: str, job_timeout_s: float = 0.0,
                 out_prefix: str | None = None, allowed_nodes: set[str] | None = None, lease: float | None = None):
        self.server, self.s3, self.db, self.name = ComfyServer(comfyui), s3, db, name
        self.job_timeout_s, self.out_prefix = job_timeout_s, (out_prefix or "").rstrip("/")
        self.allowed_nodes = allowed_nodes if allowed_nodes is not None else pack_nodes()
        self.lease_s = lease or lease_s()
        self.app = None
        self.node: str | None = None  # Celery's name for this worker (celery@<name> when --name has no @)
        self.consuming = True
        self.blockers: dict[str, tuple[str, float]] = {}  # cause -> (reason, since)
        self.lock, self.send_lock = threading.Lock(), threading.Lock()
        self.standard: dict | None = None  # the standard batch workflow: what a healthy ComfyUI must run
        self.last_store: str | None = None

    # -- pausing: stop taking jobs while something this worker needs is down; take them again when it is back -----
    def block(self, cause: str, reason: str) -> None:
        with self.lock:
            self.blockers.setdefault(cause, (reason, time.monotonic()))
        self._apply()

    def _apply(self, resend: bool = False) -> None:
        """Tell Celery to consume or not, as the blockers say. The state is recorded only once the command went
        out (a broker blip leaves it to the next health check), and commands go out in the order decided."""
        if self.app is None or self.node is None:
            return
        with self.send_lock:
            with self.lock:
                wanted = not self.blockers
                reasons = "; ".join(reason for reason, _ in self.blockers.values())
            if wanted == self.consuming and not resend:
                return
            try:
                if wanted:
                    self.app.control.add_consumer(QUEUE, destination=[self.node])
                else:
                    self.app.control.cancel_consumer(QUEUE, destination=[self.node])
            except Exception as exc:  # noqa: BLE001 (the next health check sends it again)
                log.warning("%s could not %s the queue: %s", self.name, "resume" if wanted else "pause", exc)
                return
            if wanted != self.consuming:
                if wanted:
                    log.warning("%s takes jobs again (its ComfyUI at %s, the store and the job database answer)",
                                self.name, self.server.url)
                else:
                    log.warning("%s takes no jobs until this is fixed: %s", self.name, reasons)
            self.consuming = wanted

    def recheck(self, resend: bool = False) -> None:
        """Clear each cause that is gone (exceptions are a cause that stays)."""
        for cause in list(self.blockers):
            reason, since = self.blockers[cause]
            try:
                gone = {"comfyui": self.server.alive,
                        "health": lambda: not self.health_problems(),
                        "store": lambda: self.last_store is None or self.s3.check_bucket(self.last_store) is None,
                        "database": lambda: self.db.now() is not None,
                        "url": lambda: time.monotonic() - since > URL_REFUSED_PAUSE_S,
                        "error": lambda: time.monotonic() - since > ERROR_PAUSE_S}[cause]()
            except Exception:  # noqa: BLE001 (still down)
                gone = False
            if gone:
                with self.lock:
                    self.blockers.pop(cause, None)
        self._apply(resend)  # now and then again: the broker may have lost a command (Redis's are fire and forget)

    def check_health(self) -> list[str]:
        """At start: pause (with the reasons, logged) when this worker's ComfyUI cannot run the standard workflow."""
        try:
            problems = self.health_problems()
        except Exception as exc:  # noqa: BLE001 (unreachable, or an answer that is not ComfyUI's)
            problems = [f"its ComfyUI at {self.server.url} does not answer ({exc})"]
        if problems:
            self.block("health", "; ".join(problems))
            if self.app is None:  # no broker to pause (the service's executor): say it here
                log.warning("%s takes no jobs until this is fixed: %s", self.name, "; ".join(problems))
        return problems

    def health_problems(self) -> list[str]:
        if not self.server.alive():
            return [f"its ComfyUI at {self.server.url} does not answer"]
        info = self.server.object_info()
        missing = sorted(name for name in pack_nodes() if name not in info)
        if missing:
            return [f"its ComfyUI at {self.server.url} lacks this pack's nodes ({', '.join(missing)}): install "
                    "sonic-portrait into its custom_nodes"]
        if self.standard is None:
            return []
        problems = [f"its ComfyUI at {self.server.url}: {p}" for p in comfyui_cannot_run(info, self.standard)]
        return problems or self.model_problems(self.standard)

    def workflow_problems(self, prompt: dict) -> list[str]:
        """What this ComfyUI lacks for one batch's own workflow (its nodes' choices, its model files)."""
        problems = [f"its ComfyUI at {self.server.url}: {p}"
                    for p in comfyui_cannot_run(self.server.object_info(), prompt)]
        return problems or self.model_problems(prompt)

    def model_problems(self, prompt: dict) -> list[str]:
        """Model files the workflow's Sonic Model Loader needs and this ComfyUI lacks (its /sonic/models)."""
        import urllib.error
        import urllib.parse

        problems = []
        for node in prompt.values():
            inputs = node.get("inputs", {})
            if node.get("class_type") != "SonicModelLoader" or inputs.get("download_missing") is True:
                continue
            interpolation = inputs.get("interpolation", True)
            query = urllib.parse.urlencode({
                "unet": inputs.get("sonic_unet") if isinstance(inputs.get("sonic_unet"), str) else "",
                "interpolation": "false" if interpolation is False else "true",
                "svd_weights": "false" if isinstance(inputs.get("vae"), list) else "true"})
            try:
                report = self.server.get_json(f"/sonic/models?{query}")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:  # a pack older than this check: ComfyUI's own validation decides
                    continue
                raise
            if report.get("missing"):
                problems.append(f"its ComfyUI at {self.server.url} lacks model files: {'; '.join(report['missing'])} "
                                "(python -m sonic download --models <its models/sonic>)")
        return problems

    def watch(self, stop: threading.Event) -> None:
        """The worker's own thread: re-check what paused it; never dies of an exception."""
        ticks = 0
        while not stop.wait(WATCH_S):
            ticks += 1
            try:
                if not self.server.alive():
                    self.block("comfyui", f"its ComfyUI at {self.server.url} does not answer")
                self.recheck(resend=ticks % 6 == 1)  # the first tick too: a command sent at start may be lost
            except Exception:  # noqa: BLE001
                log.exception("health check of %s failed; checking again in %g s", self.name, WATCH_S)

    # -- one job ---------------------------------------------------------------------------------------------
    def handle(self, message) -> str:
        """A message from the queue -> what happened (for the log). Never raises: the job's state is in the
        database, and whatever happens here is recorded there or left to its lease."""
        if isinstance(message, bool) or not isinstance(message, int):
            text = repr(message)
            log.error("refused a message that is not a job id (%s%s): nothing runs", text[:200],
                      "…" if len(text) > 200 else "")
            return "refused"
        if self.blockers:  # paused, but Celery's cancel has not reached the consumer yet (or was lost)
            reasons = "; ".join(reason for reason, _ in list(self.blockers.values()))
            time.sleep(1.0)
            try:
                ring(self.app, [message])  # to another worker; the reconciler would ring it again anyway
            except Exception as exc:  # noqa: BLE001
                log.warning("job #%d: could not queue it again (%s); the reconciler will", message, exc)
            log.info("job #%d passed on: %s takes no jobs (%s)", message, self.name, reasons)
            return "passed on"
        try:
            claim = self.db.claim(message, self.name, self.server.url, self.lease_s)
        except DatabaseUnavailable as exc:
            self.block("database", str(exc))
            return "database unavailable"  # the job stays queued; the reconciler rings again
        if isinstance(claim, str):
            log.info("job #%d not taken: %s", message, claim)
            return "not taken"
        for server, prompt_id in claim.taken_over:  # a lapsed attempt's prompt may still render on its server
            threading.Thread(target=ComfyServer(server).cancel, args=(prompt_id, 5.0), daemon=True).start()
        lost = threading.Event()
        stop = threading.Event()
        beat = threading.Thread(target=self.heartbeat, args=(claim, lost, stop), daemon=True,
                                name=f"sonic-lease-{claim.job_id}")
        beat.start()
        try:
            return self.attempt(claim, lost)
        except Exception as exc:  # noqa: BLE001 (recorded; never the job's fault unless known to be)
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if is_infrastructure(exc):
                self.hand_back(claim, reason, infrastructure=True)
                self.block("database" if isinstance(exc, DatabaseUnavailable) else "store", reason)
            else:
                log.exception("job %s (#%d): unexpected error", claim.name, claim.job_id)
                self.hand_back(claim, reason, infrastructure=True)
                self.block("error", f"an unexpected error ({reason}); trying again in {ERROR_PAUSE_S:g} s")
            return "error"
        finally:
            stop.set()
            beat.join(10)

    def heartbeat(self, claim: Claim, lost: threading.Event, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 4):
            try:
                if not self.db.heartbeat(claim.job_id, claim.token, self.lease_s) and not stop.is_set():
                    log.warning("job %s (#%d): another worker took it (this attempt's lease lapsed); interrupting "
                                "its prompt here", claim.name, claim.job_id)
                    lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 (the database may be back before the lease lapses)
                log.warning("job %s (#%d): could not renew its lease: %s", claim.name, claim.job_id, exc)

    def hand_back(self, claim: Claim, reason: str, infrastructure: bool, delay: float | None = None) -> str | None:
        """The job goes back to queued (after a backoff) or, for its own repeated failure, to failed."""
        if delay is None:
            delay = min(float(claim.batch["backoff_s"]) * 2 ** min(claim.attempts - 1, 6), 300.0)
        try:
            state = self.db.release(claim.job_id, claim.token, reason, delay, job_failure=not infrastructure)
        except DatabaseUnavailable as exc:
            self.block("database", str(exc))
            return None  # its lease lapses; the job comes back then
        log.warning("job %s (#%d): %s -> %s%s", claim.name, claim.job_id, reason, state or "not ours any more",
                    f" (next try in {delay:g} s)" if state == "queued" else "")
        return state

    def fail(self, claim: Claim, error: str, prompt_id: str | None = None) -> str:
        accepted = self.db.finish(claim.job_id, claim.token, "failed", error=error, prompt_id=prompt_id)
        log.warning("job %s (#%d) failed: %s%s", claim.name, claim.job_id, error,
                    "" if accepted else " (not recorded: another attempt holds the job)")
        return "failed"

    def refuse(self, claim: Claim) -> str | None:
        """Why this worker will not run the batch at all (its location or its nodes), or None."""
        batch = claim.batch
        if self.out_prefix and not (batch["uri"] + "/").startswith(self.out_prefix + "/"):
            return f"batch location {batch['uri']} is not under this worker's --out-prefix {self.out_prefix}"
        foreign = sorted({node.get("class_type") for node in batch["workflow"].values()} - self.allowed_nodes)
        if foreign:
            return (f"the workflow uses nodes this worker does not run: {', '.join(map(str, foreign))} "
                    "(allow them with SONIC_FLEET_NODES)")
        return None

    def attempt(self, claim: Claim, lost: threading.Event) -> str:
        batch = claim.batch
        refusal = self.refuse(claim)
        if refusal:  # this worker's policy, not the job's fault: another worker (or a fixed setting) may run it
            log.error("job %s (#%d) refused: %s", claim.name, claim.job_id, refusal)
            self.hand_back(claim, f"refused by worker {self.name}: {refusal}", infrastructure=True,
                           delay=REFUSED_RETRY_S)
            return "refused"
        store = BatchStore(self.s3, batch["uri"], batch["url_expiry_s"])
        self.last_store = batch["uri"]
        job = Job.from_message(claim.spec)
        if claim.staged_key:  # an earlier attempt stored the output: publish it, never render it again
            return self.publish(claim, store, job, lost, claim.staged_key, claim.sha256, claim.bytes, None, None)
        workflow = Workflow(Path(batch["workflow_name"]), batch["workflow"], batch["workflow_digest"])
        try:
            problems = self.health_problems()
            own = [] if problems else self.workflow_problems(workflow.prompt)
        except (ServerUnreachable, OSError) as exc:
            problems, own = [f"its ComfyUI at {self.server.url} does not answer ({exc})"], []
        if problems:  # this ComfyUI cannot run the standard workflow: the worker's problem, it pauses
            self.hand_back(claim, "; ".join(problems), infrastructure=True)
            self.block("health", "; ".join(problems))
            return "paused"
        if own:  # what only this batch's workflow names: tried on other workers, then failed with the reason
            self.hand_back(claim, "; ".join(own), infrastructure=False)
            return "retry"
        started = time.monotonic()
        temps: list[Path] = []
        try:
            sources = []
            for source in (job.image, job.audio):
                if source.kind == "url":
                    sources.append(("", source.location))
                elif source.kind == "s3":
                    sources.append((self.upload_input(source, temps), ""))
                else:  # never a path on the worker's disk
                    return self.fail(claim, f"{source.location!r}: a fleet job's inputs must be http(s):// or s3://")
        except FileNotFoundError as exc:  # the job's own input is missing
            return self.fail(claim, str(exc))
        except Unavailable as exc:
            self.hand_back(claim, f"inputs: {exc}", infrastructure=True)
            self.block(exc.cause, str(exc))
            return "paused"
        finally:
            for temp in temps:
                temp.unlink(missing_ok=True)
        prompt = workflow.bind(job, sources[0], sources[1], f"sonic-fleet/{job.id}", batch["schema"])
        inputs_done = time.monotonic()

        def queued(prompt_id: str) -> None:
            try:
                self.db.note_prompt(claim.job_id, claim.token, prompt_id)
            except DatabaseUnavailable as exc:
                log.warning("job %s: prompt id not recorded: %s", claim.name, exc)

        samplers, last, denoised = set(workflow.nodes("SonicSampler")), [0.0], [False]

        def progress(data: dict) -> None:  # denoising steps, for the service's job view (at most twice a second)
            if denoised[0] or str(data.get("node")) not in samplers or not isinstance(data.get("value"), int):
                return  # after the last step the sampler's bar counts decoded frames: not denoising
            now = time.monotonic()
            denoised[0] = data["value"] >= int(data.get("max") or 0) > 0
            if now - last[0] < 0.5 and not denoised[0]:
                return
            last[0] = now
            try:
                self.db.progress(claim.job_id, claim.token, data["value"], int(data.get("max") or 0))
            except DatabaseUnavailable:
                pass  # progress is a courtesy; the lease and the result are what count

        try:
            outcome = self.server.run(prompt, on_queued=queued, on_progress=progress, cancel=lost,
                                      timeout_s=self.job_timeout_s or None)
        except PromptRejected as exc:  # this ComfyUI has what the workflow names (checked above): the job's fault
            return self.fail(claim, f"rejected by {self.server.url}: {exc}")
        except ServerUnreachable as exc:
            self.hand_back(claim, f"ComfyUI at {self.server.url}: {exc}", infrastructure=True)
            self.block("comfyui", f"its ComfyUI at {self.server.url} does not answer ({exc})")
            return "paused"
        comfyui_done = time.monotonic()
        if outcome.status == "cancelled" and lost.is_set():
            return "lost its lease"
        if outcome.status == "success":
            return self.store_output(claim, store, job, workflow, outcome, lost, (started, inputs_done, comfyui_done))
        error = outcome.error or outcome.status
        if "SONIC_URL_ALLOW" in error:  # the operator's allow-list, not the job
            self.hand_back(claim, error, infrastructure=True)
            self.block("url", f"{error} (set SONIC_URL_ALLOW for the ComfyUI at {self.server.url}; this worker "
                              f"tries again in {URL_REFUSED_PAUSE_S:g} s)")
            return "paused"
        if outcome.status == "lost":  # ComfyUI went away mid-job
            self.hand_back(claim, error, infrastructure=True)
            if not self.server.alive():
                self.block("comfyui", f"its ComfyUI at {self.server.url} does not answer ({error})")
            return "handed back"
        if outcome.transient:
            self.hand_back(claim, error, infrastructure=False)
            return "retry"
        return self.fail(claim, error, outcome.prompt_id or None)

    def upload_input(self, source, temps: list[Path]) -> str:
        """An s3:// input -> the name ComfyUI's loader takes (downloaded here, uploaded there by content)."""
        suffix = Path(source.location).suffix[:16]
        fd, name = tempfile.mkstemp(prefix="sonic-fleet-input-", suffix=suffix)
        os.close(fd)
        temp = Path(name)
        temps.append(temp)
        try:
            digest, _ = self.s3.download(source.location, temp)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_infrastructure(exc):
                raise Unavailable("store", f"the store did not answer ({type(exc).__name__}: {exc})") from None
            raise
        try:
            return self.server.upload(temp, f"{digest[:24]}{suffix}", UPLOAD_SUBFOLDER)
        except (ServerUnreachable, OSError) as exc:
            raise Unavailable("comfyui", f"its ComfyUI at {self.server.url} did not take the input ({exc})") from None

    def store_output(self, claim: Claim, store: BatchStore, job: Job, workflow: Workflow, outcome, lost,
                     stamps: tuple[float, float, float]) -> str:
        temp = store.outputs.temp_file(job.id)
        try:
            try:
                sha256, size = self.server.download(workflow.video_entry(outcome.history), temp)
            except (ServerUnreachable, OSError) as exc:
                self.hand_back(claim, f"fetching the MP4 from {self.server.url}: {exc}", infrastructure=True)
                return "handed back"
            staged = store.staged_uri(job.id, claim.token)
            metadata = job.metadata(sha256, outcome.prompt_id)
            if not self.patiently(lambda: self.s3.upload(temp, staged, metadata, "video/mp4"), lost,
                                  f"storing {job.id}'s MP4"):
                return self.given_up(claim, lost, "the store did not take the MP4")
        finally:
            temp.unlink(missing_ok=True)
        extra = {"timings": timings(*stamps, outcome.history),
                 "lipsync": lipsync_fields(workflow, outcome.history) or None}
        result = {}

        def stage():
            result["accepted"] = self.db.stage(claim.job_id, claim.token, staged, sha256, size)

        if not self.patiently(stage, lost, f"recording {job.id}'s MP4"):
            return self.given_up(claim, lost, "the job database did not answer", "database")
        if not result["accepted"]:  # another attempt holds the job, or staged its output first: ours is not used
            log.warning("job %s (#%d): its MP4 was refused (another attempt holds the job)", job.id, claim.job_id)
            self.db.fenced(claim.job_id, claim.token, "its MP4 was refused: another attempt holds the job")
            try:
                self.s3.delete(staged)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not remove %s: %s", staged, exc)
            return "refused"
        return self.publish(claim, store, job, lost, staged, sha256, size, outcome.prompt_id, extra)

    def publish(self, claim: Claim, store: BatchStore, job: Job, lost, staged: str, sha256: str, size: int,
                prompt_id: str | None, extra: dict | None) -> str:
        """The staged MP4 of this job (whichever attempt made it) -> the job's key; then the job is done."""
        final = store.output_uri(job.id)
        try:
            copied = self.patiently(lambda: self.s3.copy(staged, final), lost, f"publishing {job.id}'s MP4")
        except FileNotFoundError:  # removed from outside (a lifecycle rule): render it again
            self.db.unstage(claim.job_id, claim.token)
            self.hand_back(claim, f"its stored MP4 {staged} is gone; it is made again", infrastructure=True, delay=0.0)
            return "handed back"
        if not copied:
            return self.given_up(claim, lost, "the store did not copy the MP4")
        fields = {"output_key": final, "sha256": sha256, "bytes": size, **(extra or {})}
        if prompt_id:
            fields["prompt_id"] = prompt_id
        result = {}

        def finish():
            result["accepted"] = self.db.finish(claim.job_id, claim.token, "done", error=None, **fields)

        if not self.patiently(finish, lost, f"recording {job.id} as done"):
            return self.given_up(claim, lost, "the job database did not answer", "database")
        if not result["accepted"]:
            log.warning("job %s (#%d): its result was refused (another attempt holds the job)", job.id, claim.job_id)
            return "refused"
        try:
            self.s3.delete(staged)
        except Exception as exc:  # noqa: BLE001 (a leftover attempt object, nothing more)
            log.warning("could not remove %s: %s", staged, exc)
        log.info("job %s (#%d) done: %s", job.id, claim.job_id, final)
        return "done"

    def patiently(self, action, lost: threading.Event, what: str) -> bool:
        """Run `action` until it works, backing off (2 s doubling to 60 s) through store or database outages, for
        as long as this attempt holds its lease and SONIC_STORE_PATIENCE allows. -> whether it worked."""
        patience = env_seconds("SONIC_STORE_PATIENCE", 3600.0)
        deadline, delay = time.monotonic() + patience, 2.0
        while True:
            try:
                action()
                return True
            except Exception as exc:  # noqa: BLE001
                if not is_infrastructure(exc):
                    raise
                if lost.is_set() or time.monotonic() + delay > deadline:
                    return False
                log.warning("%s: %s; trying again in %g s", what, exc, delay)
                if lost.wait(delay):
                    return False
                delay = min(delay * 2, 60.0)

    def given_up(self, claim: Claim, lost, reason: str, cause: str = "store") -> str:
        if lost.is_set():
            return "lost its lease"
        self.hand_back(claim, reason, infrastructure=True)
        self.block(cause, reason)
        return "handed back"

    # -- the reconciler ----------------------------------------------------------------------------------------
    def reconcile_forever(self, stop: threading.Event, interval_s: float) -> None:
        from .reconcile import reconcile

        while not stop.wait(interval_s):
            try:
                reconcile(self.db, self.app, self.name, interval_s)
            except Exception as exc:  # noqa: BLE001 (the next round tries again)
                log.warning("reconciler: %s", exc)


def serve(broker: str, comfyui: str, database: str, concurrency: int = 1, name: str | None = None,
          s3_endpoint: str | None = None, s3_addressing: str = "auto", job_timeout_s: float = 0.0,
          out_prefix: str | None = None) -> int:
    """Run a worker until SIGTERM/Ctrl-C (warm shutdown: the running job finishes first)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    port = comfyui.rstrip("/").rsplit(":", 1)[-1]
    name = name or f"sonic-{port if port.isdigit() else 'comfyui'}-{os.getpid()}@{socket.gethostname()}"
    db = JobDB(database)
    db.upgrade()  # a new database gets its tables; concurrent upgrades wait for each other
    extra_nodes = {n.strip() for n in os.environ.get("SONIC_FLEET_NODES", "").split(",") if n.strip()}
    worker = Worker(comfyui, S3(s3_endpoint, s3_addressing), db, name, job_timeout_s,
                    out_prefix or os.environ.get("SONIC_FLEET_OUT"), pack_nodes() | extra_nodes)
    try:  # until a job names its own, check the model files the standard batch workflow needs
        worker.standard = Workflow.load(None).prompt
    except (OSError, ValueError):
        pass
    if not worker.out_prefix:
        log.warning("%s runs batches stored anywhere its credentials reach; give --out-prefix s3://bucket/prefix "
                    "(or SONIC_FLEET_OUT) to run only your own", name)
    app = make_app(broker)
    worker.app = app
    interval = env_seconds("SONIC_RECONCILE_INTERVAL", 10.0)

    @app.task(name=TASK, bind=True, acks_late=True)
    def run_job(task, job_id):
        return worker.handle(job_id)

    stop = threading.Event()
    threads = [threading.Thread(target=worker.watch, args=(stop,), daemon=True, name="sonic-health"),
               threading.Thread(target=worker.reconcile_forever, args=(stop, interval), daemon=True,
                                name="sonic-reconcile")]

    from celery.signals import worker_ready

    @worker_ready.connect(weak=False)
    def _ready(sender=None, **_):
        worker.node = getattr(sender, "hostname", None) or name
        for thread in threads:
            thread.start()
        worker.check_health()
        log.info("%s serves %s from %s (job database %s; lease %g s)", name, comfyui, safe_url(broker), db.display,
                 worker.lease_s)

    argv = ["worker", "--pool", "solo" if concurrency == 1 else "threads", "--concurrency", str(concurrency),
            "--queues", QUEUE, "--hostname", name, "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
        db.close()
    return EXIT_OK
