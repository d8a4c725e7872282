"""The job database's tables. Times are seconds since the epoch from the database's own clock (`db_now`), so that
leases do not depend on the workers' clocks agreeing.

States only move forward: queued -> running -> done | failed | cancelled; running -> queued when a lease lapses or
the worker hands the job back for a reason that is not the job's (store, database, ComfyUI unreachable); failed ->
queued only by an operator's `--retry-failed` (recorded in the attempts table).
"""

from __future__ import annotations

from sqlalchemy import (JSON, BigInteger, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")

metadata = MetaData(naming_convention={"ix": "ix_%(table_name)s_%(column_0_N_name)s",
                                       "uq": "uq_%(table_name)s_%(column_0_N_name)s",
                                       "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
                                       "pk": "pk_%(table_name)s"})

batches = Table(
    "batches", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False),
    Column("uri", String(1024), nullable=False, unique=True),  # where the outputs go: s3://bucket/prefix/<name>
    Column("tenant", String(128)),
    Column("workflow", JSON, nullable=False),  # the API-format prompt every job binds its inputs into
    Column("workflow_name", String(256), nullable=False),
    Column("workflow_digest", String(64), nullable=False),
    Column("schema", JSON, nullable=False),  # the node inputs the jobs' columns bind to
    Column("jobs_digest", String(64), nullable=False),  # the submitted jobs: a re-submit must match
    Column("retries", Integer, nullable=False),
    Column("backoff_s", Float, nullable=False),
    Column("url_expiry_s", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("idempotency_key", String(256)),  # the service's Idempotency-Key: one batch per tenant and key
    Column("webhook_url", String(2048)),  # the service's per-job (per-batch) webhook; else the tenant's
    UniqueConstraint("tenant", "idempotency_key"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),  # what a queue message carries, and nothing else
    Column("batch_id", Integer, ForeignKey("batches.id"), nullable=False),
    Column("name", String(256), nullable=False),  # the jobs file's id
    Column("position", Integer, nullable=False),
    Column("key", String(64), nullable=False),  # digest of inputs + parameters + workflow
    Column("spec", JSON, nullable=False),  # inputs (kind, location, sha256) and parameters
    Column("image_key", String(1024)),  # inputs' object keys and sha256, for audit
    Column("image_sha256", String(64)),
    Column("audio_key", String(1024)),
    Column("audio_sha256", String(64)),
    Column("state", String(16), nullable=False),
    Column("token", Integer, nullable=False),  # fencing token: incremented by every claim
    Column("attempts", Integer, nullable=False),  # claims that ran (or started to)
    Column("failures", Integer, nullable=False),  # attempts that failed for a reason of the job's own
    Column("not_before", Float, nullable=False),  # backoff: not claimable before
    Column("lease_until", Float),
    Column("doorbell_at", Float),  # last time a message was queued for it
    Column("worker", String(256)),
    Column("server", String(1024)),
    Column("prompt_id", String(64)),
    Column("staged_key", String(1024)),  # the current token holder's stored output, before it is final
    Column("output_key", String(1024)),
    Column("sha256", String(64)),
    Column("bytes", BigInteger),
    Column("timings", JSON),
    Column("lipsync", JSON),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("progress_value", Integer),  # denoising progress of the running attempt (steps done, of max)
    Column("progress_max", Integer),
    UniqueConstraint("batch_id", "name"),
    Index(None, "batch_id", "state"),
    Index(None, "state", "not_before"),
)

attempts = Table(
    "attempts", metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("token", Integer, nullable=False),
    Column("worker", String(256)),
    Column("server", String(1024)),
    Column("prompt_id", String(64)),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", String(32)),  # done, failed, released, retry, lease expired, fenced, retry-failed
    Column("error", Text),
    Index(None, "job_id"),
)

tenants = Table(
    "tenants", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("webhook_secret", String(128), nullable=False),  # whsec_<base64>: signs the tenant's webhooks
    Column("created_at", Float, nullable=False),
    Column("webhook_url", String(2048)),  # where the tenant's job.* events go (a job's own webhook_url wins)
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True),
    Column("tenant_id", Integer, ForeignKey("tenants.id"), nullable=False),
    Column("prefix", String(16), nullable=False),  # the key's first characters, to tell keys apart
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 of the key: keys are shown once
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

webhook_events = Table(  # the outbox: written in the transaction that ends the job, sent by the service
    "webhook_events", metadata,
    Column("id", Integer, primary_key=True),
    Column("msg_id", String(64), nullable=False, unique=True),  # webhook-id: the same for every retry
    Column("tenant", String(128), nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("type", String(32), nullable=False),  # job.done, job.failed, job.cancelled
    Column("url", String(2048), nullable=False),
    Column("body", Text, nullable=False),  # the exact bytes signed and sent, every time
    Column("state", String(16), nullable=False),  # pending, delivered, failed (retries spent)
    Column("attempts", Integer, nullable=False),
    Column("next_at", Float, nullable=False),  # not sent before (backoff; also a sender's claim)
    Column("created_at", Float, nullable=False),
    Column("ended_at", Float),
    Index(None, "state", "next_at"),
    Index(None, "tenant", "id"),
)

webhook_deliveries = Table(  # every try to deliver an event, append-only
    "webhook_deliveries", metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", Integer, ForeignKey("webhook_events.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("status_code", Integer),  # the receiver's answer, None when there was none
    Column("error", Text),
    Column("duration_ms", Float),
    Index(None, "event_id"),
)

triggers = Table(  # objects that started a job (--watch, /v1/events/s3): each key + ETag at most once
    "triggers", metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(1024), nullable=False),
    Column("etag", String(256), nullable=False),
    Column("tenant", String(128)),
    Column("batch_id", Integer, ForeignKey("batches.id")),
    Column("error", Text),  # why no job started (a bad description), shown to the operator
    Column("created_at", Float, nullable=False),
    UniqueConstraint("key", "etag"),
)

settings = Table(  # the service's own secrets and settings (the signing key of its file links)
    "settings", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

locks = Table(
    "locks", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    Column("until", Float, nullable=False),
)


class db_now(FunctionElement):
    """The database server's clock, in seconds since the epoch (fractional)."""

    type = Float()
    inherit_cache = True


@compiles(db_now)
def _now_postgresql(element, compiler, **kw):
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now, "sqlite")
def _now_sqlite(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"
