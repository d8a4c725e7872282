"""Downloads of user-given http(s) URLs that cannot be turned against the server's own network.

A shared ComfyUI must not become a proxy into the network it runs in (server-side request forgery): every
connection, the first and each redirect's, is made to an address checked after DNS resolution, and addresses that
are loopback, private, link-local (169.254.169.254, the clouds' metadata service), multicast or reserved are
refused unless the operator allows them in SONIC_URL_ALLOW (comma-separated host names, addresses or networks in
CIDR form, e.g. `127.0.0.1,10.0.0.0/8,minio.internal`). The socket connects to the address that was checked, so a
second DNS answer cannot slip past. Downloads have an overall deadline, kept even against a server that sends one
byte at a time (every socket read waits at most for what is left of it), and a size cap.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ALLOW_ENV = "SONIC_URL_ALLOW"
MAX_BYTES = 200 * 2**20
DEADLINE_S = 300.0
READ_TIMEOUT_S = 30.0
BLOCK = 1 << 16

_sockets = threading.local()  # the socket of this thread's latest connection, for the download's deadline


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https")


def _allowed() -> tuple[set[str], list]:
    hosts, networks = set(), []
    for item in filter(None, (part.strip() for part in os.environ.get(ALLOW_ENV, "").split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower())
    return hosts, networks


def check_address(host: str, address: str) -> None:
    """PermissionError when `address` (what `host` resolved to) is internal and not allowed by the operator."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    internal = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    if not internal:
        return
    hosts, networks = _allowed()
    if host.lower() in hosts or any(ip in network for network in networks):
        return
    kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private" if ip.is_private
            else "reserved")
    raise PermissionError(f"{host} is {ip}, a {kind} address: downloads from the server's own network are refused. "
                          f"An operator can allow it on the ComfyUI server with {ALLOW_ENV}={host}")


def _connect(address, timeout=None, source_address=None):
    host, port = address
    last = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        check_address(host, sockaddr[0])
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)  # the address just checked, not a second lookup
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"{host} has no address")


class _Checked:
    """A connection made only to checked addresses, remembering its socket (TLS-wrapped for https) so that the
    download can bound each read by its deadline."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect

    def connect(self):
        super().connect()
        _sockets.latest = self.sock


class _HTTPConnection(_Checked, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Checked, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):  # urllib would follow ftp:// too, past the address check
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL refused: {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler, _RedirectHandler)


def fetch(url: str, folder: Path, max_bytes: int = MAX_BYTES, deadline_s: float = DEADLINE_S) -> Path:
    """Download `url` into a new file in `folder` (the caller deletes it). ValueError says what went wrong."""
    if not is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(urllib.parse.urlparse(url).path).suffix[:8]
    fd, name = tempfile.mkstemp(dir=folder, prefix="sonic-url-", suffix=suffix)
    target, deadline = Path(name), time.monotonic() + deadline_s
    too_slow = ValueError(f"{url} took longer than {deadline_s:g} s to download")
    try:
        with os.fdopen(fd, "wb") as out, _opener.open(url, timeout=min(READ_TIMEOUT_S, deadline_s)) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"{url} is {int(declared) >> 20} MB, more than the {max_bytes >> 20} MB allowed")
            sock, size = _sockets.latest, 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise too_slow
                sock.settimeout(min(READ_TIMEOUT_S, left))  # one read never waits past the deadline
                try:
                    block = response.read1(BLOCK)  # what one socket read brings, not a full block
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise too_slow from None
                    raise
                if not block:
                    break
                size += len(block)
                if size > max_bytes:
                    raise ValueError(f"{url} is larger than the {max_bytes >> 20} MB allowed")
                out.write(block)
        return target
    except urllib.error.URLError as exc:
        target.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, PermissionError):
            raise ValueError(str(reason)) from None
        raise ValueError(f"could not download {url}: {exc}") from exc
    except (OSError, http.client.HTTPException) as exc:
        target.unlink(missing_ok=True)
        raise ValueError(f"could not download {url}: {exc}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
