"""One ComfyUI server seen through its queue API (HTTP + WebSocket; ComfyUI 0.8.0, spec: comfyui-notes §8).

`ComfyServer.run` queues one prompt and follows it to its end the way a robust client must: the websocket is open
(with our own client id) before the prompt is posted under our own prompt id; events of other prompts are
ignored; a lost socket is reconnected and the prompt looked up in /queue and /history, so that a server that
died or restarted is told apart from one that is only slow; cancelling removes the prompt from the queue and
interrupts it only if it is ours.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HTTP_TIMEOUT_S = 30
PROBE_TIMEOUT_S = 5  # health and queue-length checks: the scheduler must not hang on a black-holed server
POLL_S = 1.0  # websocket read timeout: how often a waiting job looks at its cancel flag and deadline
CHECK_S = 20.0  # without events for this long, check that the prompt still exists on the server
RECONNECT_S = 10.0  # how long a lost websocket is retried before the server counts as gone
TRANSIENT_ERRORS = ("OutOfMemoryError", "out of memory", "CUDA error", "HIP error", "MPS backend out of memory")


class ServerUnreachable(ConnectionError):
    """The server did not answer (refused, reset, timed out): try another server."""


class PromptRejected(ValueError):
    """ComfyUI refused the prompt (HTTP 400: validation); the message says which node and input."""


@dataclass
class Outcome:
    """How a prompt ended. status: success, error, interrupted, lost (server gone or restarted), timeout, cancelled."""

    status: str
    prompt_id: str
    history: dict = field(default_factory=dict)
    error: str = ""
    transient: bool = False


def describe_rejection(reply: dict) -> str:
    error = reply.get("error", {})
    parts = [error.get("message", "prompt rejected") if isinstance(error, dict) else str(error)]
    for node_id, info in (reply.get("node_errors") or {}).items():
        for item in info.get("errors", []):
            parts.append(f"{info.get('class_type', '?')} (node {node_id}): {item.get('message', '')}: "
                         f"{item.get('details', '')}".rstrip(": "))
    return "; ".join(parts)


def describe_error(data: dict) -> tuple[str, bool]:
    """execution_error data -> (message naming the node, transient?). Out-of-memory is transient; the job's own
    bad input (no face, unreadable file, duration longer than the audio) is not."""
    kind = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]  # a module path may name the pack's folder
    text = f"{kind}: {str(data.get('exception_message') or '').strip()}"
    message = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')}): {text}"
    return message, any(marker in text for marker in TRANSIENT_ERRORS)


def execution_seconds(history: dict) -> float | None:
    """How long ComfyUI executed a finished prompt (its execution_start / execution_success timestamps, ms)."""
    stamps = {event: data.get("timestamp") for event, data in history.get("status", {}).get("messages", [])
              if isinstance(data, dict)}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000
    return None


class ComfyServer:
    def __init__(self, url: str):
        url = url.rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"--server {url!r}: give the server's base URL, e.g. http://127.0.0.1:8188")
        self.url = url
        self.ws_url = ("wss" if parsed.scheme == "https" else "ws") + "://" + parsed.netloc + parsed.path + "/ws"

    def __repr__(self) -> str:
        return f"ComfyServer({self.url})"

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def request(self, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = HTTP_TIMEOUT_S):
        """The open response (caller closes it). HTTP errors raise HTTPError; no answer raises ServerUnreachable."""
        request = urllib.request.Request(self.url + path, body, headers or {}, method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (the operator's server URL)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as exc:
            raise ServerUnreachable(f"{self.url} did not answer: {getattr(exc, 'reason', exc)}") from exc

    def get_json(self, path: str, timeout: float = HTTP_TIMEOUT_S):
        with self.request(path, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def post_json(self, path: str, body: dict):
        with self.request(path, json.dumps(body).encode(), {"Content-Type": "application/json"}) as response:
            data = response.read()
            return json.loads(data) if data else {}

    def alive(self) -> bool:
        try:
            self.get_json("/system_stats", timeout=PROBE_TIMEOUT_S)
            return True
        except (ServerUnreachable, urllib.error.HTTPError, ValueError):
            return False

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue_remaining(self) -> int:
        return int(self.get_json("/prompt", timeout=PROBE_TIMEOUT_S)["exec_info"]["queue_remaining"])

    def queued_ids(self) -> tuple[set[str], set[str]]:
        """(running prompt ids, pending prompt ids)."""
        queue = self.get_json("/queue")
        return ({item[1] for item in queue.get("queue_running", [])}, {item[1] for item in queue.get("queue_pending", [])})

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id, {})

    def upload(self, path: Path, name: str, subfolder: str) -> str:
        """Put a file into the server's input folder; -> the name a loader takes ("subfolder/name")."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = "".join(f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}"
                       for key, value in (("subfolder", subfolder), ("overwrite", "true"), ("type", "input")))
        body = head + Path(path).read_bytes() + (tail + f"\r\n--{boundary}--\r\n").encode()
        with self.request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"},
                          timeout=300) as response:
            reply = json.loads(response.read())
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]

    def download(self, entry: dict, target: Path) -> tuple[str, int]:
        """Stream an output file (an entry of history outputs) to `target`; -> (sha256, bytes)."""
        query = urllib.parse.urlencode({k: entry.get(k, "") for k in ("filename", "subfolder", "type")})
        digest, size = hashlib.sha256(), 0
        with self.request(f"/view?{query}", timeout=300) as response, open(target, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                size += len(block)
                out.write(block)
        return digest.hexdigest(), size

    def cancel(self, prompt_id: str, wait_s: float = 15.0) -> None:
        """Remove our prompt from the queue if it waits, interrupt it if it runs (by id: never another user's
        prompt), and wait until the server no longer holds it (an interrupt lands at the node's next check)."""
        deadline = time.monotonic() + wait_s
        try:
            while True:
                self.post_json("/queue", {"delete": [prompt_id]})
                self.post_json("/interrupt", {"prompt_id": prompt_id})
                running, pending = self.queued_ids()
                if prompt_id not in running | pending or time.monotonic() > deadline:
                    return
                time.sleep(0.2)
        except (ServerUnreachable, urllib.error.HTTPError):
            pass  # a server that is gone has nothing of ours left to run

    # -- one prompt, followed to its end ------------------------------------------------------------------------
    def submit(self, prompt: dict, prompt_id: str, client_id: str) -> None:
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        try:
            reply = self.post_json("/prompt", body)
        except urllib.error.HTTPError as exc:
            try:
                reply = json.loads(exc.read() or b"{}")
            except ValueError:
                reply = {}
            if exc.code == 400:
                raise PromptRejected(describe_rejection(reply)) from None
            raise ServerUnreachable(f"{self.url} answered /prompt with HTTP {exc.code}") from None
        if reply.get("node_errors"):
            self.cancel(prompt_id)
            raise PromptRejected(describe_rejection(reply))

    def _connect(self, client_id: str):
        import websocket  # websocket-client

        try:
            return websocket.create_connection(f"{self.ws_url}?clientId={client_id}", timeout=POLL_S,
                                               enable_multithread=True)
        except (OSError, websocket.WebSocketException) as exc:
            raise ServerUnreachable(f"{self.url}: websocket: {exc}") from exc

    def _where(self, prompt_id: str) -> str:
        """'finished', 'queued' or 'gone' (raises ServerUnreachable when the server does not answer)."""
        if self.history(prompt_id):
            return "finished"
        running, pending = self.queued_ids()
        return "queued" if prompt_id in running | pending else "gone"

    def _finished(self, prompt_id: str) -> Outcome:
        entry = self.history(prompt_id)
        status = entry.get("status", {})
        if status.get("status_str") == "success":
            return Outcome("success", prompt_id, entry)
        for event, data in status.get("messages", []):
            if event == "execution_error":
                message, transient = describe_error(data)
                return Outcome("error", prompt_id, entry, message, transient)
            if event == "execution_interrupted":
                return Outcome("interrupted", prompt_id, entry, "interrupted on the server", True)
        return Outcome("error", prompt_id, entry, f"ended with status {status.get('status_str')!r}", True)

    def run(self, prompt: dict, *, on_queued=None, on_progress=None, cancel: threading.Event | None = None,
            timeout_s: float | None = None) -> Outcome:
        """Queue `prompt` and wait for its end. Raises PromptRejected (bad prompt) or ServerUnreachable (before it
        was queued); after that every ending, including the server's death, is an Outcome."""
        import websocket

        cancel = cancel or threading.Event()
        client_id, prompt_id = uuid.uuid4().hex, uuid.uuid4().hex
        ws, queued = self._connect(client_id), False
        try:
            if cancel.is_set():
                return Outcome("cancelled", prompt_id)
            self.submit(prompt, prompt_id, client_id)
            queued = True
            if on_queued:
                on_queued(prompt_id)
            started = last_event = time.monotonic()
            while True:
                if cancel.is_set():
                    self.cancel(prompt_id)
                    return Outcome("cancelled", prompt_id)
                now = time.monotonic()
                if timeout_s and now - started > timeout_s:
                    self.cancel(prompt_id)
                    return Outcome("timeout", prompt_id, error=f"did not finish in {timeout_s:g} s (--job-timeout)",
                                   transient=True)
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if now - last_event > CHECK_S:  # quiet for long: is the prompt still there?
                        last_event = now
                        where = self._where_or_gone(prompt_id)
                        if where != "queued":
                            return self._ended(prompt_id, where)
                    continue
                except (OSError, websocket.WebSocketException):
                    ws.close()
                    ws = self._reconnect(client_id)
                    where = self._where_or_gone(prompt_id) if ws is not None else "unreachable"
                    if where != "queued":
                        return self._ended(prompt_id, where)
                    continue
                if not isinstance(message, str):
                    continue  # binary previews
                last_event = time.monotonic()
                event = json.loads(message)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                kind = event.get("type")
                if kind == "progress" and on_progress:
                    on_progress(data)
                elif kind == "execution_error":
                    message_text, transient = describe_error(data)
                    return Outcome("error", prompt_id, error=message_text, transient=transient)
                elif kind == "execution_interrupted":
                    return Outcome("interrupted", prompt_id, error="interrupted on the server (not by this batch)",
                                   transient=True)
                elif kind == "executing" and data.get("node") is None:
                    return self._finished(prompt_id)
        except ServerUnreachable as exc:
            if not queued:
                raise
            return Outcome("lost", prompt_id, error=str(exc), transient=True)
        finally:
            if ws is not None:
                ws.close()

    def _reconnect(self, client_id: str):
        """A new socket after a network blip; None when the server is gone (refused: its process has ended, and
        with it ComfyUI's in-memory queue)."""
        deadline = time.monotonic() + RECONNECT_S
        while time.monotonic() < deadline:
            try:
                return self._connect(client_id)
            except ServerUnreachable as exc:
                if isinstance(exc.__cause__, ConnectionRefusedError):
                    return None
                time.sleep(0.5)
        return None

    def _where_or_gone(self, prompt_id: str) -> str:
        try:
            return self._where(prompt_id)
        except ServerUnreachable:
            return "unreachable"

    def _ended(self, prompt_id: str, where: str) -> Outcome:
        if where == "finished":
            return self._finished(prompt_id)
        reason = ("the server stopped answering" if where == "unreachable"
                  else "the prompt vanished from the server's queue (server restarted?)")
        return Outcome("lost", prompt_id, error=f"{self.url}: {reason}", transient=True)
