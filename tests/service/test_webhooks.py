"""Webhook delivery (sonic/service/webhooks.py over sonic/jobdb/webhooks.py) on SQLite and on a real PostgreSQL,
to a real receiver on loopback that checks every request with the Standard Webhooks reference verifier (PyPI
`standardwebhooks`): a job's end is delivered once, signed, with the same id and bytes on every try; failed tries
are retried on the documented schedule and logged; internal addresses are refused without sending; redirects are
not followed; two senders never send the same event twice."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from sonic.jobdb import JobDB
from sonic.jobdb.tenants import Tenants
from sonic.jobdb.webhooks import Webhooks
from sonic.service.metrics import REGISTRY
from sonic.service.webhooks import BACKOFF_S, Sender, retry_delay_s, sign

TENANT = "acme"


_made = iter(range(10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    import sqlalchemy

    server = request.getfixturevalue("postgres")
    name = f"w{next(_made)}"
    admin = sqlalchemy.create_engine(server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def db(db_url):
    database = JobDB(db_url)
    database.upgrade()
    yield database
    database.close()


@pytest.fixture
def sqlite_db(tmp_path):
    database = JobDB(f"sqlite:///{tmp_path / 'jobs.db'}")
    database.upgrade()
    yield database
    database.close()


@pytest.fixture
def secret(db):
    return Tenants(db).create_key(TENANT)[1]


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv("SONIC_URL_ALLOW", "127.0.0.1")


class Receiver:
    """A tenant's webhook endpoint on 127.0.0.1: every request (any method, any path) is kept with whether the
    reference verifier accepted it; POSTs are answered from `answers` in turn (the last one repeats)."""

    def __init__(self, secret: str, answers: list[int]):
        self.verifier, self.answers, self.requests = Webhook(secret), answers, []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    receiver.verifier.verify(body, dict(self.headers))
                    verified = True
                except WebhookVerificationError:
                    verified = False
                with receiver.lock:
                    receiver.requests.append({"method": "POST", "path": self.path,
                                              "headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body.decode(), "verified": verified})
                    status = receiver.answers[min(len(receiver.requests), len(receiver.answers)) - 1]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/moved")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                with receiver.lock:
                    receiver.requests.append({"method": "GET", "path": self.path})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/sonic"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_for():
    made = []

    def make(secret, answers):
        made.append(Receiver(secret, answers))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def one_job_batch(db, name="j_portrait1", webhook_url=None, jobs=1):
    batch = {"name": name, "uri": f"s3://studio/renders/{name}", "workflow": {"1": {"class_type": "SonicLoadImage"}},
             "workflow_name": "w.json", "workflow_digest": "d" * 64, "schema": {}, "retries": 1, "backoff_s": 0.0,
             "url_expiry_s": 7200, "tenant": TENANT, "webhook_url": webhook_url}
    rows = [{"name": f"j{n}", "key": f"k{n}", "spec": {"id": f"j{n}", "params": {"seed": n}}} for n in range(jobs)]
    batch_id, _ = db.create_batch(batch, rows)
    return [row["id"] for row in db.job_rows(batch_id)]


def wait_for(condition, timeout_s=10.0, what="the condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("sonic_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def test_the_schedule_is_standard_webhooks_and_about_a_day(monkeypatch):
    assert [retry_delay_s(n) for n in range(1, 9)] == [5, 300, 1800, 7200, 18000, 36000, 36000, None]
    assert 24 * 3600 < sum(BACKOFF_S) < 30 * 3600
    assert retry_delay_s(2, 0.001) == pytest.approx(0.3)
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "fast")
    with pytest.raises(ValueError, match="SONIC_WEBHOOK_BACKOFF_SCALE='fast'"):
        Sender(None)


def test_a_cancelled_job_is_delivered_after_two_500s_with_the_same_id_and_body(db, secret, receiver_for,
                                                                                allow_loopback, monkeypatch):
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "0.001")  # retries after 5 ms, then 300 ms
    receiver = receiver_for(secret, [500, 500, 200])
    (job_id,) = one_job_batch(db, webhook_url=receiver.url)
    assert db.cancel(job_id) == ("queued", None, None)
    webhooks = Webhooks(db)
    before = {outcome: counted(outcome) for outcome in ("delivered", "retry")}

    with Sender(db, poll_s=0.02):
        log = wait_for(lambda: [row for row in webhooks.deliveries(TENANT, 10) if row["event_state"] == "delivered"],
                       what="the delivery")

    assert [(row["attempt"], row["status_code"]) for row in reversed(log)] == [(1, 500), (2, 500), (3, 200)]
    assert {row["msg_id"] for row in log} == {receiver.requests[0]["headers"]["webhook-id"]}
    assert {(row["type"], row["job"], row["url"]) for row in log} == {("job.cancelled", "j_portrait1", receiver.url)}
    assert log[0]["error"] is None and log[-1]["error"] == "HTTP 500 Internal Server Error"
    assert all(row["duration_ms"] >= 0 for row in log)
    assert len(receiver.requests) == 3 and all(request["verified"] for request in receiver.requests)
    assert len({request["headers"]["webhook-id"] for request in receiver.requests}) == 1
    assert len({request["body"] for request in receiver.requests}) == 1
    first = receiver.requests[0]
    assert first["headers"]["content-type"] == "application/json"
    assert first["headers"]["user-agent"] == "sonic-portrait"
    assert first["headers"]["webhook-signature"] == sign(secret, first["headers"]["webhook-id"],
                                                         int(first["headers"]["webhook-timestamp"]), first["body"])
    body = json.loads(first["body"])
    assert body["type"] == "job.cancelled"
    assert body["data"] == {"id": "j_portrait1", "state": "cancelled", "batch": None, "error": "cancelled",
                            "output": None}
    assert counted("delivered") - before["delivered"] == 1 and counted("retry") - before["retry"] == 2


def test_an_internal_address_is_refused_without_sending(db, secret, receiver_for, monkeypatch):
    monkeypatch.delenv("SONIC_URL_ALLOW", raising=False)
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "1")  # the retry waits 5 s: past this test
    receiver = receiver_for(secret, [200])
    (job_id,) = one_job_batch(db, webhook_url=receiver.url)
    db.cancel(job_id)
    webhooks, refused = Webhooks(db), counted("refused")

    with Sender(db, poll_s=0.02):
        (row,) = wait_for(lambda: webhooks.deliveries(TENANT, 10), what="the first try")

    assert row["status_code"] is None and row["event_state"] == "pending" and row["attempt"] == 1
    assert "127.0.0.1" in row["error"] and "SONIC_URL_ALLOW" in row["error"] and "not sent" in row["error"]
    assert receiver.requests == []
    assert counted("refused") - refused == 1


def test_a_redirect_is_a_failed_try_and_is_not_followed(sqlite_db, receiver_for, allow_loopback, monkeypatch):
    secret = Tenants(sqlite_db).create_key(TENANT)[1]
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "1")
    receiver = receiver_for(secret, [302])
    (job_id,) = one_job_batch(sqlite_db, webhook_url=receiver.url)
    sqlite_db.cancel(job_id)

    with Sender(sqlite_db, poll_s=0.02):
        (row,) = wait_for(lambda: Webhooks(sqlite_db).deliveries(TENANT, 10), what="the first try")
        time.sleep(0.2)  # time enough to follow a redirect, were it followed

    assert row["status_code"] == 302 and "redirects are not followed" in row["error"]
    assert row["event_state"] == "pending"
    assert [(request["method"], request["path"]) for request in receiver.requests] == [("POST", "/hooks/sonic")]


def test_two_senders_on_one_database_deliver_each_event_once(db, db_url, secret, receiver_for, allow_loopback,
                                                            monkeypatch):
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "0.001")
    receiver = receiver_for(secret, [200])
    other = JobDB(db_url)  # another service process's connections
    try:
        with Sender(db, name="one", poll_s=0.01), Sender(other, name="two", poll_s=0.01):
            for job_id in one_job_batch(db, name="many", webhook_url=receiver.url, jobs=12):
                db.cancel(job_id)
            wait_for(lambda: len(Webhooks(db).deliveries(TENANT, 100)) >= 12, what="twelve deliveries")
            time.sleep(0.1)  # time enough for a second send of any event
    finally:
        other.close()

    ids = [request["headers"]["webhook-id"] for request in receiver.requests]
    assert len(ids) == len(set(ids)) == 12 and all(request["verified"] for request in receiver.requests)
    log = Webhooks(db).deliveries(TENANT, 100)
    assert len(log) == 12
    assert {row["status_code"] for row in log} == {200} and sorted(row["job"] for row in log) == sorted(
        f"many~j{n}" for n in range(12))


def test_an_event_fails_when_its_retries_are_spent(sqlite_db, receiver_for, allow_loopback, monkeypatch):
    secret = Tenants(sqlite_db).create_key(TENANT)[1]
    monkeypatch.setenv("SONIC_WEBHOOK_BACKOFF_SCALE", "0.000001")  # the whole day in 0.1 s
    receiver = receiver_for(secret, [503])
    (job_id,) = one_job_batch(sqlite_db, webhook_url=receiver.url)
    sqlite_db.cancel(job_id)
    failed = counted("failed")

    with Sender(sqlite_db, poll_s=0.01):
        log = wait_for(lambda: [row for row in Webhooks(sqlite_db).deliveries(TENANT, 20)
                                if row["event_state"] == "failed"], what="the event to fail")

    assert [row["attempt"] for row in reversed(log)] == list(range(1, len(BACKOFF_S) + 2))
    assert {row["status_code"] for row in log} == {503} and len(receiver.requests) == len(BACKOFF_S) + 1
    assert counted("failed") - failed == 1


def test_a_claim_holds_an_event_until_it_lapses(db, secret):
    Webhooks(db).set_tenant_webhook(TENANT, "https://hooks.example.com/sonic")
    (job_id,) = one_job_batch(db)
    db.cancel(job_id)
    one, two = Webhooks(db), Webhooks(db)

    (event,) = one.claim_due("one", 10, hold_s=1.0)
    assert event.url == "https://hooks.example.com/sonic" and event.attempts == 0 and event.type == "job.cancelled"
    assert event.secret == secret and secret not in repr(event)
    assert two.claim_due("two", 10, hold_s=30) == []
    time.sleep(1.1)  # "one" crashed: its claim lapses
    (again,) = two.claim_due("two", 10, hold_s=30)
    assert again.id == event.id and one.claim_due("one", 10, hold_s=30) == []


def test_the_tenant_side_webhook_url_secret_and_delivery_log(db, secret):
    webhooks = Webhooks(db)
    assert webhooks.secret(TENANT) == secret and webhooks.secret("nobody") is None
    assert webhooks.tenant_webhook(TENANT) is None
    assert webhooks.set_tenant_webhook(TENANT, "https://hooks.example.com/a")
    assert webhooks.tenant_webhook(TENANT) == "https://hooks.example.com/a"
    assert not webhooks.set_tenant_webhook("nobody", "https://hooks.example.com/a")
    first, second = one_job_batch(db, name="two", jobs=2)
    db.cancel(first)
    assert webhooks.set_tenant_webhook(TENANT, None) and webhooks.tenant_webhook(TENANT) is None
    db.cancel(second)  # no URL any more: no event
    (event,) = webhooks.claim_due("s", 10, hold_s=30)
    assert webhooks.record(event.id, 1, 500, "HTTP 500", 3.5, retry_in_s=0.0, final_state=None)
    assert not webhooks.record(event.id, 1, 500, "HTTP 500", 3.5, retry_in_s=0.0, final_state=None)  # a stale try
    assert webhooks.record(event.id, 1, 200, None, 2.0, retry_in_s=None, final_state="delivered")

    log = webhooks.deliveries(TENANT, 10)
    assert [(row["status_code"], row["attempt"], row["event_state"]) for row in log] == [
        (200, 1, "delivered"), (500, 1, "delivered"), (500, 1, "delivered")]
    assert [row["id"] for row in webhooks.deliveries(TENANT, 10, before_id=log[0]["id"])] == [log[1]["id"],
                                                                                               log[2]["id"]]
    assert len(webhooks.deliveries(TENANT, 10, job_public_id="two~j0")) == 3
    assert webhooks.deliveries(TENANT, 10, job_public_id="two~j1") == []
    assert webhooks.deliveries(TENANT, 10, job_public_id="two") == []
    assert webhooks.deliveries(TENANT, 10, event_type="job.done") == []
    assert webhooks.deliveries("other", 10) == []
    assert webhooks.claim_due("s", 10, hold_s=30) == []  # delivered: never sent again


def test_stop_is_prompt(sqlite_db):
    sender = Sender(sqlite_db, poll_s=30).start()
    time.sleep(0.1)
    started = time.monotonic()
    sender.stop()
    assert time.monotonic() - started < 1
