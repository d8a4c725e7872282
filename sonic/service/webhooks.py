"""Webhook delivery: the service's sender, which posts the outbox's events (`sonic.jobdb.webhooks`) to the tenants'
receivers, signed per the Standard Webhooks spec (https://www.standardwebhooks.com).

Every try of an event sends the same bytes with the same `webhook-id` (receivers de-duplicate by it); the
`webhook-timestamp` is the time of the try and the signature covers "id.timestamp.body". A 2xx answer delivers the
event. Anything else fails the try: another status (a 3xx too: redirects are never followed, so that a receiver
cannot point the service at another address), no answer (connection error, timeout after TIMEOUT_S), or a host that
now resolves to an address of the service's own network (refused without sending; checked at every try, and the
socket connects to the very address checked, so a DNS answer that changes after the URL was accepted cannot slip
through). Failed tries are retried after BACKOFF_S (the spec's suggested schedule: about 28 hours in all), then the
event is failed. Every try is in the tenant's delivery log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..inputs.urls import ALLOW_ENV, check_address, is_url
from ..jobdb.webhooks import Event, Webhooks
from .metrics import WEBHOOK_DELIVERIES

log = logging.getLogger("sonic.service.webhooks")

# after the first try (when the job ends): retries after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h — Standard
# Webhooks' suggested schedule; the event fails after its 8th try
BACKOFF_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
BACKOFF_SCALE_ENV = "SONIC_WEBHOOK_BACKOFF_SCALE"  # multiplies every delay (tests make the schedule short)
TIMEOUT_S = 10.0  # for the connection and for each read of the answer
HOLD_S = 60.0  # a claimed event is this sender's for this long (longer than a try takes)
USER_AGENT = "sonic-portrait"
SECRET_PREFIX = "whsec_"


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: v1,<base64 HMAC-SHA256 of "id.timestamp.body" keyed by the secret's bytes>."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def backoff_scale() -> float:
    text = os.environ.get(BACKOFF_SCALE_ENV, "1")
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not scale >= 0:
        raise ValueError(f"{BACKOFF_SCALE_ENV}={text!r}: give a number >= 0 (it multiplies the webhook retry delays)")
    return scale


def retry_delay_s(attempt: int, scale: float = 1.0) -> float | None:
    """After try number `attempt` (1 = the first) failed: seconds until the next, or None when the retries are spent."""
    return BACKOFF_S[attempt - 1] * scale if attempt <= len(BACKOFF_S) else None


# -- one POST ------------------------------------------------------------------------------------------------
class Refused(PermissionError):
    """The receiver's host resolves to an internal address that the operator has not allowed: nothing was sent."""


def _connect(address, timeout=None, source_address=None):
    """http.client's connection, made only when every address the host resolves to is public (or allowed), and to
    one of those addresses (no second lookup between the check and the connection)."""
    host, port = address
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in found:
        try:
            check_address(host, sockaddr[0])
        except PermissionError:
            raise Refused(f"{host} resolves to {sockaddr[0]}, an address of the service's own network: not sent "
                          f"(an operator can allow it with {ALLOW_ENV}={host})") from None
    last = None
    for family, kind, proto, _, sockaddr in found:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"{host} has no address")


class _Connection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _SecureConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_Connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_SecureConnection, req, context=self._context)


def _opener() -> urllib.request.OpenerDirector:
    """http and https only, no proxy (the address check is about the connection this process makes) and no
    redirect handler: a 3xx is an error like any other non-2xx."""
    opener = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(), _HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


@dataclass
class Try:
    """What one POST came to."""

    status_code: int | None  # None: no answer
    error: str | None  # None when delivered
    duration_ms: float
    refused: bool = False  # not sent: the address is internal (or the URL not http(s))

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, body: str, headers: dict[str, str], timeout_s: float = TIMEOUT_S) -> Try:
    started = time.monotonic()

    def ended(status_code, error, refused=False) -> Try:
        return Try(status_code, error, round((time.monotonic() - started) * 1000, 1), refused)

    if not is_url(url):
        return ended(None, "not an http(s) URL: not sent", refused=True)
    request = urllib.request.Request(url, data=body.encode(), method="POST", headers={
        "Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return ended(response.status, None)
    except urllib.error.HTTPError as exc:
        with exc:
            if 300 <= exc.code < 400:
                location = (exc.headers.get("Location") or "")[:200]
                return ended(exc.code, f"HTTP {exc.code}: redirects are not followed (Location: {location})")
            return ended(exc.code, f"HTTP {exc.code} {exc.reason}")
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, Refused):
            return ended(None, str(reason), refused=True)
        if isinstance(reason, TimeoutError):
            return ended(None, f"no answer within {timeout_s:g} s")
        return ended(None, f"no answer: {reason}")


# -- the sender ----------------------------------------------------------------------------------------------
class Sender:
    """Threads that claim due events and try each once, until stop(). Several service processes may each run one
    on the same database: an event is claimed by one of them at a time (`Webhooks.claim_due`)."""

    def __init__(self, db, name: str | None = None, threads: int = 4, poll_s: float = 2.0, hold_s: float = HOLD_S,
                 timeout_s: float = TIMEOUT_S, scale: float | None = None):
        assert hold_s > 2 * timeout_s, "a claim must outlast a try (its connection and its answer)"
        self.scale = backoff_scale() if scale is None else scale
        self.webhooks = Webhooks(db)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.threads, self.poll_s, self.hold_s, self.timeout_s = threads, poll_s, hold_s, timeout_s
        self._stopping = threading.Event()
        self._running: list[threading.Thread] = []

    def start(self) -> Sender:
        assert not self._running, "started already"
        self._stopping.clear()
        self._running = [threading.Thread(target=self._run, name=f"webhooks-{n}", daemon=True)
                         for n in range(self.threads)]
        for thread in self._running:
            thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """At once when idle; a try in flight finishes first (it ends within its timeouts). An event claimed but
        not tried is due again when the claim lapses."""
        self._stopping.set()
        deadline = time.monotonic() + (3 * self.timeout_s if timeout_s is None else timeout_s)
        for thread in self._running:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._running = []

    def __enter__(self) -> Sender:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            events: list[Event] = []
            try:
                events = self.webhooks.claim_due(self.name, 1, self.hold_s)
                for event in events:
                    self.deliver(event)
            except Exception as exc:  # the database is unreachable, say: this thread carries on after a pause
                log.warning("webhook sender %s: %s", self.name, exc)
                events = []
            if not events:
                self._stopping.wait(self.poll_s)

    def deliver(self, event: Event) -> str:
        """One try of a claimed event, recorded -> its outcome, as counted in WEBHOOK_DELIVERIES: delivered;
        refused (not sent: an internal address) or retry (tried again later); failed (its retries are spent)."""
        attempt = event.attempts + 1
        headers = signed_headers(event.secret, event.msg_id, int(time.time()), event.body)
        result = post(event.url, event.body, headers, self.timeout_s)
        retry_in_s = final_state = None
        if result.delivered:
            outcome = final_state = "delivered"
        else:
            retry_in_s = retry_delay_s(attempt, self.scale)
            final_state = None if retry_in_s is not None else "failed"
            outcome = "failed" if final_state else "refused" if result.refused else "retry"
            next_try = "gave up" if final_state else f"next try in {retry_in_s:.3g} s"
            log.warning("webhook %s (%s, tenant %s) to %s: try %d failed: %s; %s", event.msg_id, event.type,
                        event.tenant, urllib.parse.urlsplit(event.url).hostname, attempt, result.error, next_try)
        WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()  # first: whoever sees the logged try sees it counted
        self.webhooks.record(event.id, attempt, result.status_code, result.error, result.duration_ms, retry_in_s,
                             final_state)
        return outcome
