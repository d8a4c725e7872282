"""The webhook outbox's database side: claiming due events for a sender, recording every try, the tenant's log of
deliveries, and the tenant's webhook URL and signing secret.

An event (written by `db._emit` in the transaction that ended its job) is due when it is pending and its `next_at`
has passed on the database's clock. A sender claims it with one conditional UPDATE that moves `next_at` to
now + hold_s only if `next_at` is still the value it read: of two service processes that read the same event, one
wins, and a sender that crashes mid-send loses its claim after hold_s, when the event is due again. Delivery is
therefore at least once (a sender slower than hold_s may race a second one); receivers de-duplicate by webhook-id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import insert, select, update

from .db import JOB_SEPARATOR, SINGLE_PREFIX, JobDB, _unavailable, public_job_id
from .schema import batches, db_now, jobs, tenants, webhook_deliveries, webhook_events

log = logging.getLogger(__name__)

EVENT_TYPES = ("job.done", "job.failed", "job.cancelled")  # what `_emit` writes; the log filters by these
CANDIDATES_PER_CLAIM = 4  # read this many times `limit` due events: racing senders each still find unclaimed ones


@dataclass
class Event:
    """A claimed event: what the sender posts (the exact body, every try) and signs it with."""

    id: int
    msg_id: str
    tenant: str
    job_id: int
    type: str
    url: str
    body: str
    attempts: int  # tries recorded before this one
    secret: str = field(repr=False)  # the tenant's whsec_ signing secret: never in a repr, a log or an error


class Webhooks:
    def __init__(self, db: JobDB):
        self.db = db
        self.display = db.display

    # -- the sender's side -----------------------------------------------------------------------------------
    @_unavailable
    def claim_due(self, sender: str, limit: int, hold_s: float) -> list[Event]:
        """Up to `limit` due events, each now held by this caller for hold_s (its next_at moved to now + hold_s).
        An event another sender claimed between the read and the UPDATE is skipped."""
        query = (select(webhook_events.c.id, webhook_events.c.next_at)
                 .where(webhook_events.c.state == "pending", webhook_events.c.next_at <= db_now())
                 .order_by(webhook_events.c.next_at, webhook_events.c.id).limit(limit * CANDIDATES_PER_CLAIM))
        with self.db.reader.connect() as connection:
            candidates = connection.execute(query).all()
        claimed: list[int] = []
        with self.db.engine.begin() as connection:
            for event_id, seen_next_at in candidates:
                if len(claimed) == limit:
                    break
                if connection.execute(update(webhook_events)
                                      .where(webhook_events.c.id == event_id, webhook_events.c.state == "pending",
                                             webhook_events.c.next_at == seen_next_at)
                                      .values(next_at=db_now() + hold_s)).rowcount == 1:
                    claimed.append(event_id)
        if not claimed:
            return []
        with self.db.reader.connect() as connection:
            found = connection.execute(
                select(webhook_events.c.id, webhook_events.c.msg_id, webhook_events.c.tenant, webhook_events.c.job_id,
                       webhook_events.c.type, webhook_events.c.url, webhook_events.c.body, webhook_events.c.attempts,
                       tenants.c.webhook_secret)
                .join(tenants, tenants.c.name == webhook_events.c.tenant)
                .where(webhook_events.c.id.in_(claimed)).order_by(webhook_events.c.id)).all()
        log.debug("%s claimed webhook events %s for %g s", sender, claimed, hold_s)
        return [Event(*row) for row in found]

    @_unavailable
    def record(self, event_id: int, attempt: int, status_code: int | None, error: str | None,
               duration_ms: float | None, retry_in_s: float | None, final_state: str | None) -> bool:
        """One try, in one transaction: its row in the delivery log, and the event's new state — `final_state`
        'delivered' or 'failed' (ended now), or None: pending again, due in retry_in_s. -> False when the event had
        moved on meanwhile (another sender's try after this one's claim lapsed, recorded first): the try is logged
        all the same, and the event keeps the other sender's outcome, except that a delivery always ends it."""
        assert final_state in (None, "delivered", "failed"), final_state
        assert final_state is not None or retry_in_s is not None, "a pending event needs its next try's delay"
        now = db_now()
        values = ({"state": "pending", "next_at": now + retry_in_s} if final_state is None
                  else {"state": final_state, "ended_at": now})
        current = [webhook_events.c.id == event_id, webhook_events.c.state == "pending"]
        if final_state != "delivered":
            current.append(webhook_events.c.attempts == attempt - 1)
        with self.db.engine.begin() as connection:
            connection.execute(insert(webhook_deliveries).values(
                event_id=event_id, attempt=attempt, at=now, status_code=status_code, error=error,
                duration_ms=duration_ms))
            return connection.execute(
                update(webhook_events).where(*current)
                .values(attempts=webhook_events.c.attempts + 1, **values)).rowcount == 1

    # -- the tenant's view -----------------------------------------------------------------------------------
    @_unavailable
    def deliveries(self, tenant: str, limit: int, before_id: int | None = None, event_type: str | None = None,
                   job_public_id: str | None = None) -> list[dict]:
        """The tenant's delivery log, newest first: `limit` tries from before delivery id `before_id` (a cursor),
        optionally of one event type and of one job (its public id). Each: id (the cursor), msg_id, type, url,
        job (public id), attempt, at, status_code (None: no answer), error, duration_ms, event_state."""
        query = (select(webhook_deliveries.c.id, webhook_events.c.msg_id, webhook_events.c.type, webhook_events.c.url,
                        batches.c.name.label("batch_name"), jobs.c.name.label("job_name"),
                        webhook_deliveries.c.attempt, webhook_deliveries.c.at, webhook_deliveries.c.status_code,
                        webhook_deliveries.c.error, webhook_deliveries.c.duration_ms,
                        webhook_events.c.state.label("event_state"))
                 .select_from(webhook_deliveries
                              .join(webhook_events, webhook_deliveries.c.event_id == webhook_events.c.id)
                              .join(jobs, jobs.c.id == webhook_events.c.job_id)
                              .join(batches, batches.c.id == jobs.c.batch_id))
                 .where(webhook_events.c.tenant == tenant)
                 .order_by(webhook_deliveries.c.id.desc()).limit(limit))
        if before_id is not None:
            query = query.where(webhook_deliveries.c.id < before_id)
        if event_type is not None:
            query = query.where(webhook_events.c.type == event_type)
        if job_public_id is not None:
            batch_name, _, job_name = job_public_id.partition(JOB_SEPARATOR)
            if not job_name and not batch_name.startswith(SINGLE_PREFIX):
                return []  # a many-job batch's name is not a job's id
            query = query.where(batches.c.name == batch_name)
            if job_name:
                query = query.where(jobs.c.name == job_name)
        with self.db.reader.connect() as connection:
            rows = connection.execute(query).mappings().all()
        return [{"id": row["id"], "msg_id": row["msg_id"], "type": row["type"], "url": row["url"],
                 "job": public_job_id(row["batch_name"], row["job_name"]), "attempt": row["attempt"], "at": row["at"],
                 "status_code": row["status_code"], "error": row["error"], "duration_ms": row["duration_ms"],
                 "event_state": row["event_state"]} for row in rows]

    @_unavailable
    def set_tenant_webhook(self, tenant: str, url: str | None) -> bool:
        """The tenant's webhook URL (None: none) for jobs without their own -> False when there is no such tenant.
        The caller checks the URL (a public http(s) address); the sender checks its address again at every try."""
        with self.db.engine.begin() as connection:
            return connection.execute(update(tenants).where(tenants.c.name == tenant)
                                      .values(webhook_url=url)).rowcount == 1

    @_unavailable
    def tenant_webhook(self, tenant: str) -> str | None:
        with self.db.reader.connect() as connection:
            return connection.execute(select(tenants.c.webhook_url).where(tenants.c.name == tenant)).scalar()

    @_unavailable
    def secret(self, tenant: str) -> str | None:
        """The tenant's whsec_ signing secret (what its receiver verifies with), or None for no such tenant."""
        with self.db.reader.connect() as connection:
            return connection.execute(select(tenants.c.webhook_secret).where(tenants.c.name == tenant)).scalar()
