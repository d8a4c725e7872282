"""sonic/inputs/urls.py: user URLs cannot reach the server's own network unless the operator allows it."""

from __future__ import annotations

import functools
import http.server
import threading
import time

import pytest

from sonic.inputs import urls


@pytest.fixture()
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path; /go?to=URL redirects."""
    (tmp_path / "hello.txt").write_bytes(b"hello" * 1000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/drip":  # one byte every 0.3 s: never idle long enough for a per-read timeout
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:  # the client gave up
                    pass
                return
            if self.path.startswith("/go?to="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/go?to="):])
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.7", "169.254.169.254", "::1", "fe80::1",
                                     "::ffff:127.0.0.1", "0.0.0.0"])
def test_internal_addresses_are_refused_by_default(monkeypatch, address):
    monkeypatch.delenv(urls.ALLOW_ENV, raising=False)
    with pytest.raises(PermissionError, match=urls.ALLOW_ENV):
        urls.check_address("example.test", address)
    urls.check_address("example.test", "93.184.215.14")  # a public address passes


def test_operator_allow_list_by_host_and_network(monkeypatch):
    monkeypatch.setenv(urls.ALLOW_ENV, "minio.internal, 10.0.0.0/8")
    urls.check_address("minio.internal", "192.168.1.5")
    urls.check_address("anything", "10.20.30.40")
    with pytest.raises(PermissionError):
        urls.check_address("other", "192.168.1.5")
    with pytest.raises(PermissionError):
        urls.check_address("169.254.169.254", "169.254.169.254")  # metadata service: not in the list, no request sent


def test_fetch_refuses_loopback_then_allows_it(monkeypatch, tmp_path, http_server):
    url = f"http://127.0.0.1:{http_server}/hello.txt"
    monkeypatch.delenv(urls.ALLOW_ENV, raising=False)
    with pytest.raises(ValueError, match="loopback address"):
        urls.fetch(url, tmp_path / "dl")
    assert not list((tmp_path / "dl").iterdir())  # nothing left behind
    monkeypatch.setenv(urls.ALLOW_ENV, "127.0.0.1")
    path = urls.fetch(url, tmp_path / "dl")
    assert path.read_bytes() == b"hello" * 1000


def test_each_redirect_is_checked(monkeypatch, tmp_path, http_server):
    # the first host is allowed by name; its redirect to 127.0.0.1 (another name for it) is not
    monkeypatch.setenv(urls.ALLOW_ENV, "localhost")
    assert urls.fetch(f"http://localhost:{http_server}/hello.txt", tmp_path).stat().st_size == 5000
    with pytest.raises(ValueError, match="loopback"):
        urls.fetch(f"http://localhost:{http_server}/go?to=http://127.0.0.1:{http_server}/hello.txt", tmp_path)
    with pytest.raises(ValueError, match="non-http"):
        urls.fetch(f"http://localhost:{http_server}/go?to=ftp://127.0.0.1/x", tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("sonic-url-")]) == 1  # only the good download


def test_size_cap_and_missing_files(monkeypatch, tmp_path, http_server):
    monkeypatch.setenv(urls.ALLOW_ENV, "127.0.0.1")
    with pytest.raises(ValueError, match="more than the 0 MB allowed"):
        urls.fetch(f"http://127.0.0.1:{http_server}/hello.txt", tmp_path / "a", max_bytes=100)
    with pytest.raises(ValueError, match="could not download .*404"):
        urls.fetch(f"http://127.0.0.1:{http_server}/missing.txt", tmp_path / "a")
    with pytest.raises(ValueError, match="not an http"):
        urls.fetch("file:///etc/passwd", tmp_path / "a")
    assert not list((tmp_path / "a").iterdir())


def test_a_slow_drip_gives_up_at_the_deadline(monkeypatch, tmp_path, http_server):
    monkeypatch.setenv(urls.ALLOW_ENV, "127.0.0.1")
    started = time.monotonic()
    with pytest.raises(ValueError, match="took longer than 1.5 s"):
        urls.fetch(f"http://127.0.0.1:{http_server}/drip", tmp_path / "a", deadline_s=1.5)
    assert time.monotonic() - started < 30  # at the deadline, not once the 1000 bytes are in (300 s)
    assert not list((tmp_path / "a").iterdir())
