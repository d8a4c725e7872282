"""Every state change of a job as one conditional statement on the job database (see `schema` for the states).

A worker claims a job with one UPDATE that checks it is claimable (queued and past its backoff, or running under
a lease that lapsed) and increments its fencing token; every later write of that attempt (heartbeat, prompt id,
staged output, final state) names the token and changes nothing once another claim has replaced it. Leases are
measured on the database's clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, bindparam, create_engine, event, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from .schema import (attempts, batches, db_now, jobs, locks, settings, tenants, triggers, webhook_deliveries,
                     webhook_events)

DATABASE_ENV = "SONIC_DATABASE_URL"


class AlreadyTriggered(Exception):
    """This object (key + ETag) started a job before: it starts none now."""


class DatabaseUnavailable(ConnectionError):
    """The job database did not answer (or refused the connection): not any job's fault."""


def database_url(flag: str | None) -> str:
    url = flag or os.environ.get(DATABASE_ENV)
    if not url:
        raise ValueError(f"give --database (sqlite:///path/jobs.db on one machine, postgresql://user@host/db for "
                         f"many) or set {DATABASE_ENV}")
    return url


def _masked(url) -> str:
    """The URL for messages: its password, and any password in its query (`?password=`), masked."""
    query = {key: ("***" if "password" in key.lower() else value) for key, value in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True)


def _sqlite_pragmas(connection, _record):
    connection.isolation_level = None  # transactions are begun by _sqlite_begin
    cursor = connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=60000", "foreign_keys=ON", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(statement, connection):
    connection.exec_driver_sql(statement)


def _unavailable(method):
    """Connection-level database errors become DatabaseUnavailable naming the database (never its password)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except IntegrityError:
            raise
        except DBAPIError as exc:
            from sqlalchemy.exc import InterfaceError, OperationalError

            text = str(exc.orig).lower()
            if "no such table" in text or ("relation" in text and "does not exist" in text):
                raise RuntimeError(f"the job database {self.display} has no job tables: run `python -m sonic db "
                                   "upgrade --database URL`") from None
            if isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
                reason = " ".join(str(exc.orig).split())[:300]
                raise DatabaseUnavailable(f"the job database {self.display} is unreachable ({reason}); check "
                                          f"--database / {DATABASE_ENV} and that the database server runs") from None
            raise

    return wrapper


@dataclass
class Claim:
    """A job a worker now holds: what it needs to run it, and the token its writes must carry."""

    job_id: int
    token: int
    name: str
    key: str
    spec: dict
    attempts: int
    batch: dict
    staged_key: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    taken_over: list[tuple[str, str]] = field(default_factory=list)  # (server, prompt id) of a lapsed attempt


def jobs_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


SINGLE_PREFIX = "j_"  # the service's one-job batches: the batch's name is the job's public id
JOB_SEPARATOR = "~"  # a job of a many-job batch: <batch>~<job> (jobs files' ids never contain "~")


def public_job_id(batch_name: str, job_name: str) -> str:
    return batch_name if batch_name.startswith(SINGLE_PREFIX) else f"{batch_name}{JOB_SEPARATOR}{job_name}"


def _emit(connection, job_id: int, state: str) -> None:
    """In the transaction that ended the job: its webhook event (the outbox the service's sender delivers from),
    when its batch or tenant has a webhook URL. The body is fixed now: every retry sends the same bytes."""
    row = connection.execute(
        select(batches.c.name.label("batch_name"), batches.c.tenant, batches.c.webhook_url,
               tenants.c.webhook_url.label("tenant_url"), jobs.c.name, jobs.c.error, jobs.c.sha256, jobs.c.bytes,
               db_now().label("now"))
        .select_from(jobs.join(batches, jobs.c.batch_id == batches.c.id)
                     .outerjoin(tenants, tenants.c.name == batches.c.tenant))
        .where(jobs.c.id == job_id)).first()
    url = row and row.tenant and (row.webhook_url or row.tenant_url)
    if not url:
        return
    import time
    import uuid

    data = {"id": public_job_id(row.batch_name, row.name), "state": state,
            "batch": None if row.batch_name.startswith(SINGLE_PREFIX) else row.batch_name,
            "error": row.error if state != "done" else None,
            "output": {"sha256": row.sha256, "bytes": row.bytes} if state == "done" else None}
    body = json.dumps({"type": f"job.{state}", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.now)),
                       "data": data}, separators=(",", ":"), sort_keys=True)
    connection.execute(insert(webhook_events).values(
        msg_id=f"msg_{uuid.uuid4().hex}", tenant=row.tenant, job_id=job_id, type=f"job.{state}", url=url, body=body,
        state="pending", attempts=0, next_at=row.now, created_at=row.now))


class JobDB:
    def __init__(self, url: str, echo: bool = False, pool_size: int = 2):
        """pool_size: PostgreSQL connections kept open (a worker needs 2; the service one per request thread)."""
        parsed = make_url(url)
        if parsed.drivername == "postgresql":  # psycopg 3 is the driver we install
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.display = _masked(parsed)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed, echo=echo, connect_args={"timeout": 60})

            import sqlite3

            if sqlite3.sqlite_version_info < (3, 35):
                raise RuntimeError(f"the job database needs SQLite 3.35 or newer (this Python has "
                                   f"{sqlite3.sqlite_version}); use PostgreSQL or a newer Python")
            # writers begin IMMEDIATE (they queue up instead of failing to upgrade a read lock); readers
            # (status, the reconciler's queries) begin DEFERRED and never wait for a writer in WAL mode
            self.reader = create_engine(parsed, echo=echo, connect_args={"timeout": 60})
            for engine, begin in ((self.engine, "BEGIN IMMEDIATE"), (self.reader, "BEGIN")):
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", functools.partial(_sqlite_begin, begin))
        elif self.dialect == "postgresql":
            self.engine = create_engine(parsed, echo=echo, pool_pre_ping=True, pool_size=pool_size,
                                        connect_args={"connect_timeout": 10})
            self.reader = self.engine
        else:
            raise ValueError(f"--database {self.display}: use sqlite:///path or postgresql://user@host/db")

    # -- schema ----------------------------------------------------------------------------------------------
    @_unavailable
    def upgrade(self) -> None:
        from .migrate import upgrade

        upgrade(self.engine)

    @_unavailable
    def check_schema(self) -> None:
        from .migrate import check

        check(self.engine, self.display)

    @_unavailable
    def now(self) -> float:
        with self.reader.connect() as connection:
            return connection.execute(select(db_now())).scalar_one()

    def close(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()

    # -- submit ----------------------------------------------------------------------------------------------
    @_unavailable
    def create_batch(self, batch: dict, rows: list[dict], trigger: dict | None = None) -> tuple[int, bool]:
        """A batch and all its jobs in one transaction -> (batch id, created). The same batch submitted again
        (same location, workflow and jobs) -> its id, created False; a different one at the same location ->
        ValueError. `trigger` ({key, etag, tenant}): the object that started it, recorded in the same transaction;
        an object (key + ETag) that started a batch before -> AlreadyTriggered."""
        digest = jobs_digest(rows)
        with self.engine.begin() as connection:
            if trigger is not None:
                try:
                    with connection.begin_nested():
                        trigger_id = connection.execute(insert(triggers).values(
                            **trigger, created_at=db_now()).returning(triggers.c.id)).scalar_one()
                except IntegrityError:
                    raise AlreadyTriggered(f"{trigger['key']} (ETag {trigger['etag']}) started a job before") from None
            found = connection.execute(select(batches.c.id, batches.c.jobs_digest, batches.c.workflow_digest)
                                       .where(batches.c.uri == batch["uri"])).first()
            if found is not None:
                if found.jobs_digest != digest or found.workflow_digest != batch["workflow_digest"]:
                    raise ValueError(f"batch {batch['uri']} exists already with other jobs or another workflow; "
                                     "choose another --batch name (the same jobs file again resumes it)")
                return found.id, False
            now = connection.execute(select(db_now())).scalar_one()
            try:
                with connection.begin_nested():
                    batch_id = connection.execute(insert(batches).values(**batch, jobs_digest=digest, created_at=now)
                                                  .returning(batches.c.id)).scalar_one()
            except IntegrityError:  # the same batch submitted at the same moment by another process
                return self.create_batch_again(batch, digest)
            connection.execute(insert(jobs), [
                {"batch_id": batch_id, "position": n, "state": "queued", "token": 0, "attempts": 0, "failures": 0,
                 "not_before": 0.0, "created_at": now, **row} for n, row in enumerate(rows)])
            if trigger is not None:
                connection.execute(update(triggers).where(triggers.c.id == trigger_id).values(batch_id=batch_id))
        return batch_id, True

    @_unavailable
    def trigger_refused(self, trigger: dict, error: str) -> bool:
        """An object that could not start a job (a bad description): recorded once, with the reason -> whether
        this call recorded it (False: seen before)."""
        with self.engine.begin() as connection:
            try:
                with connection.begin_nested():
                    connection.execute(insert(triggers).values(**trigger, error=error[:2000], created_at=db_now()))
                return True
            except IntegrityError:
                return False

    @_unavailable
    def triggered(self, key: str, etag: str) -> bool:
        with self.reader.connect() as connection:
            return connection.execute(select(triggers.c.id).where(triggers.c.key == key, triggers.c.etag == etag)
                                      ).first() is not None

    @_unavailable
    def setting(self, name: str, make) -> str:
        """A service setting, made by `make()` the first time (the first process to store it wins)."""
        with self.reader.connect() as connection:
            value = connection.execute(select(settings.c.value).where(settings.c.name == name)).scalar()
        if value is not None:
            return value
        with self.engine.begin() as connection:
            try:
                with connection.begin_nested():
                    connection.execute(insert(settings).values(name=name, value=make()))
            except IntegrityError:
                pass
            return connection.execute(select(settings.c.value).where(settings.c.name == name)).scalar_one()

    @_unavailable
    def queue_position(self, job_id: int) -> int:
        """1 + the queued jobs created before this one (all tenants): where it stands in the line."""
        with self.reader.connect() as connection:
            return 1 + connection.execute(select(func.count()).where(jobs.c.state == "queued", jobs.c.id < job_id)
                                          ).scalar_one()

    @_unavailable
    def tenant_counts(self, tenant: str) -> dict[str, int]:
        with self.reader.connect() as connection:
            found = dict(connection.execute(select(jobs.c.state, func.count()).join(batches)
                                            .where(batches.c.tenant == tenant).group_by(jobs.c.state)).all())
        return {state: found.get(state, 0) for state in ("queued", "running", "done", "failed", "cancelled")}

    @_unavailable
    def tenant_times(self, tenant: str, limit: int) -> list[tuple[float, float | None, float | None]]:
        """(created, started, finished) of the tenant's newest `limit` started jobs (for run time and queue wait)."""
        with self.reader.connect() as connection:
            return [tuple(row) for row in connection.execute(
                select(jobs.c.created_at, jobs.c.started_at, jobs.c.finished_at).join(batches)
                .where(batches.c.tenant == tenant, jobs.c.started_at.is_not(None))
                .order_by(jobs.c.id.desc()).limit(limit))]

    @_unavailable
    def tenant_exists(self, tenant: str) -> bool:
        with self.reader.connect() as connection:
            return connection.execute(select(tenants.c.id).where(tenants.c.name == tenant)).first() is not None

    @_unavailable
    def tenant_batch(self, tenant: str, name: str) -> dict | None:
        with self.reader.connect() as connection:
            row = connection.execute(select(batches).where(batches.c.tenant == tenant, batches.c.name == name)
                                     ).mappings().first()
        return dict(row) if row else None

    def create_batch_again(self, batch: dict, digest: str) -> tuple[int, bool]:
        with self.reader.connect() as connection:
            found = connection.execute(select(batches.c.id, batches.c.jobs_digest, batches.c.workflow_digest)
                                       .where(batches.c.uri == batch["uri"])).one()
        if found.jobs_digest != digest or found.workflow_digest != batch["workflow_digest"]:
            raise ValueError(f"batch {batch['uri']} exists already with other jobs or another workflow; choose "
                             "another --batch name")
        return found.id, False

    @_unavailable
    def batch(self, name_or_uri: str) -> dict:
        """A batch by its URI (what submit printed) or its name."""
        column = batches.c.uri if "://" in name_or_uri else batches.c.name
        with self.reader.connect() as connection:
            found = connection.execute(select(batches).where(column == name_or_uri.rstrip("/"))).mappings().all()
        if not found:
            raise ValueError(f"no batch {name_or_uri!r} in the job database {self.display}; give what `submit` printed")
        if len(found) > 1:
            raise ValueError(f"several batches are named {name_or_uri!r}: give the s3:// URI that submit printed")
        return dict(found[0])

    # -- doorbells -------------------------------------------------------------------------------------------
    @_unavailable
    def silent(self, grace_s: float, limit: int) -> list[tuple[int, float]]:
        """Queued, claimable jobs whose last message is older than grace_s (the broker may have lost it):
        [(id, not_before)], as `rang` takes them."""
        now = db_now()
        with self.reader.connect() as connection:
            return [tuple(row) for row in connection.execute(
                select(jobs.c.id, jobs.c.not_before).where(jobs.c.state == "queued", jobs.c.not_before <= now,
                                                           jobs.c.doorbell_at < now - grace_s)
                .order_by(jobs.c.id).limit(limit))]

    @_unavailable
    def due(self, limit: int = 10_000, batch_id: int | None = None) -> list[tuple[int, float]]:
        """Queued jobs that became claimable after their last message (new, handed back and past their backoff,
        lease lapsed, retried): ring them now. [(id, not_before)], as `rang` takes them."""
        now = db_now()
        query = (select(jobs.c.id, jobs.c.not_before)
                 .where(jobs.c.state == "queued", jobs.c.not_before <= now,
                        or_(jobs.c.doorbell_at.is_(None), jobs.c.doorbell_at < jobs.c.not_before))
                 .order_by(jobs.c.id).limit(limit))
        if batch_id is not None:
            query = query.where(jobs.c.batch_id == batch_id)
        with self.reader.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    @_unavailable
    def rang(self, seen: list[tuple[int, float]]) -> None:
        """Messages were queued for these (id, not_before) pairs. A job that changed meanwhile (a worker took the
        message, then handed the job back with a new backoff) is left due: its next message is still owed."""
        if not seen:
            return
        statement = (update(jobs).where(jobs.c.id == bindparam("seen_id"), jobs.c.state == "queued",
                                        jobs.c.not_before == bindparam("seen_not_before"))
                     .values(doorbell_at=db_now()))
        with self.engine.begin() as connection:
            for start in range(0, len(seen), 5000):
                connection.execute(statement, [{"seen_id": job_id, "seen_not_before": not_before}
                                               for job_id, not_before in seen[start:start + 5000]])

    # -- one attempt -----------------------------------------------------------------------------------------
    @_unavailable
    def claim(self, job_id: int, worker: str, server: str, lease_s: float) -> Claim | str:
        """Take the job for one attempt -> Claim, or the reason it cannot be taken now (text)."""
        now = db_now()
        claimable = or_(and_(jobs.c.state == "queued", jobs.c.not_before <= now),
                        and_(jobs.c.state == "running", jobs.c.lease_until < now))
        with self.engine.begin() as connection:
            row = connection.execute(
                update(jobs).where(jobs.c.id == job_id, claimable)
                .values(state="running", token=jobs.c.token + 1, attempts=jobs.c.attempts + 1,
                        lease_until=now + lease_s, worker=worker, server=server, prompt_id=None, started_at=now,
                        progress_value=None, progress_max=None)
                .returning(jobs.c.token, jobs.c.name, jobs.c.key, jobs.c.spec, jobs.c.attempts, jobs.c.batch_id,
                           jobs.c.staged_key, jobs.c.sha256, jobs.c.bytes)).first()
            if row is None:
                found = connection.execute(select(jobs.c.state, jobs.c.worker, jobs.c.not_before, jobs.c.lease_until,
                                                  now.label("now")).where(jobs.c.id == job_id)).first()
                if found is None:
                    return "no such job in the job database"
                if found.state == "running":
                    return f"running on {found.worker} under a lease for {found.lease_until - found.now:.0f} s more"
                if found.state == "queued":
                    return f"waiting {found.not_before - found.now:.0f} s more before its next attempt"
                return f"already {found.state}"
            lapsed = connection.execute(
                update(attempts).where(attempts.c.job_id == job_id, attempts.c.ended_at.is_(None),
                                       attempts.c.token < row.token)
                .values(ended_at=now, outcome="lease expired", error="the worker stopped renewing its lease")
                .returning(attempts.c.server, attempts.c.prompt_id)).all()
            if not lapsed:  # expired by the reconciler already: its prompt may still render all the same
                lapsed = connection.execute(select(attempts.c.server, attempts.c.prompt_id).where(
                    attempts.c.job_id == job_id, attempts.c.token == row.token - 1,
                    attempts.c.outcome == "lease expired")).all()
            connection.execute(insert(attempts).values(job_id=job_id, token=row.token, worker=worker, server=server,
                                                       started_at=now))
            batch = dict(connection.execute(select(batches).where(batches.c.id == row.batch_id)).mappings().one())
        return Claim(job_id, row.token, row.name, row.key, row.spec, row.attempts, batch, row.staged_key, row.sha256,
                     row.bytes, [(s, p) for s, p in lapsed if s and p])

    def _holder(self, job_id: int, token: int):
        return and_(jobs.c.id == job_id, jobs.c.token == token, jobs.c.state == "running")

    @_unavailable
    def heartbeat(self, job_id: int, token: int, lease_s: float) -> bool:
        """Extend the lease -> False when this attempt no longer holds the job."""
        with self.engine.begin() as connection:
            return connection.execute(update(jobs).where(self._holder(job_id, token))
                                      .values(lease_until=db_now() + lease_s)).rowcount == 1

    @_unavailable
    def note_prompt(self, job_id: int, token: int, prompt_id: str) -> bool:
        with self.engine.begin() as connection:  # jobs, then attempts: the order every writer takes its locks in
            held = connection.execute(update(jobs).where(self._holder(job_id, token))
                                      .values(prompt_id=prompt_id)).rowcount == 1
            connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.token == token)
                               .values(prompt_id=prompt_id))
            return held

    @_unavailable
    def progress(self, job_id: int, token: int, value: int, maximum: int) -> bool:
        """The running attempt's denoising progress (steps done of maximum)."""
        with self.engine.begin() as connection:
            return connection.execute(update(jobs).where(self._holder(job_id, token))
                                      .values(progress_value=value, progress_max=maximum)).rowcount == 1

    @_unavailable
    def stage(self, job_id: int, token: int, staged_key: str, sha256: str, size: int) -> bool:
        """This attempt stored its output at staged_key -> False (nothing recorded) unless it holds the job and no
        output was staged before (a staged output is final: later attempts only publish it)."""
        with self.engine.begin() as connection:
            return connection.execute(update(jobs).where(self._holder(job_id, token), jobs.c.staged_key.is_(None))
                                      .values(staged_key=staged_key, sha256=sha256, bytes=size)).rowcount == 1

    @_unavailable
    def unstage(self, job_id: int, token: int) -> bool:
        """Forget a staged output that is gone from the store (the next attempt renders the job again)."""
        with self.engine.begin() as connection:
            return connection.execute(update(jobs).where(self._holder(job_id, token))
                                      .values(staged_key=None, sha256=None, bytes=None)).rowcount == 1

    @_unavailable
    def finish(self, job_id: int, token: int, state: str, **fields) -> bool:
        """The attempt's end: done (fields: output_key, sha256, bytes, timings, lipsync, prompt_id) or failed
        (error) -> False when refused (another attempt holds the job)."""
        assert state in ("done", "failed"), state
        now = db_now()
        with self.engine.begin() as connection:
            changed = connection.execute(update(jobs).where(self._holder(job_id, token))
                                         .values(state=state, lease_until=None, finished_at=now, **fields)).rowcount
            if changed:
                connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.token == token)
                                   .values(ended_at=now, outcome=state, error=fields.get("error")))
                _emit(connection, job_id, state)
            else:
                connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.token == token,
                                                          attempts.c.ended_at.is_(None))
                                   .values(ended_at=now, outcome="fenced",
                                           error=f"its {state} result was refused: another attempt holds the job"))
            return changed == 1

    @_unavailable
    def fenced(self, job_id: int, token: int, reason: str) -> None:
        """Record that an attempt's result was refused (the job itself is not touched)."""
        with self.engine.begin() as connection:
            connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.token == token,
                                                      attempts.c.ended_at.is_(None))
                               .values(ended_at=db_now(), outcome="fenced", error=reason))

    @_unavailable
    def release(self, job_id: int, token: int, reason: str, delay_s: float, job_failure: bool) -> str | None:
        """Hand the job back -> its new state: 'queued' (tried again after delay_s), or 'failed' when it was the
        job's own failure and its retries are spent; None when this attempt no longer held it. A reason that is not
        the job's (store, database or ComfyUI unreachable) never fails it."""
        now = db_now()
        with self.engine.begin() as connection:
            row = connection.execute(select(jobs.c.failures, batches.c.retries).join(batches)
                                     .where(self._holder(job_id, token)).with_for_update(of=jobs)).first()
            if row is None:
                return None
            failures = row.failures + (1 if job_failure else 0)
            state = "failed" if job_failure and failures > row.retries else "queued"
            values = {"state": state, "failures": failures, "lease_until": None, "error": reason}
            if state == "queued":
                values["not_before"] = now + delay_s
            else:
                values["finished_at"] = now
                values["error"] = f"{reason} (gave up after {failures} failed attempts)"
            if connection.execute(update(jobs).where(self._holder(job_id, token)).values(**values)).rowcount != 1:
                return None
            connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.token == token,
                                                      attempts.c.ended_at.is_(None))
                               .values(ended_at=now, outcome="retry" if job_failure else "released", error=reason))
            if state == "failed":
                _emit(connection, job_id, "failed")
        return state

    # -- the reconciler --------------------------------------------------------------------------------------
    @_unavailable
    def expire_leases(self, limit: int = 10_000) -> list[int]:
        """Running jobs whose lease lapsed -> queued again (their next claim closes the lapsed attempt)."""
        now = db_now()
        with self.engine.begin() as connection:
            ids = list(connection.execute(select(jobs.c.id).where(jobs.c.state == "running", jobs.c.lease_until < now)
                                          .limit(limit)).scalars())
            if not ids:
                return []
            expired = sorted(connection.execute(update(jobs).where(jobs.c.id.in_(ids), jobs.c.state == "running",
                                                                   jobs.c.lease_until < now)
                                                .values(state="queued", lease_until=None, not_before=now)
                                                .returning(jobs.c.id)).scalars())
            if expired:
                connection.execute(update(attempts).where(attempts.c.job_id.in_(expired), attempts.c.ended_at.is_(None))
                                   .values(ended_at=now, outcome="lease expired",
                                           error="the worker stopped renewing its lease"))
            return expired

    @_unavailable
    def lapsed_prompts(self, job_ids: list[int]) -> list[tuple[str, str]]:
        """(server, prompt id) of these jobs' attempts that ended because their lease lapsed (to interrupt)."""
        if not job_ids:
            return []
        with self.reader.connect() as connection:
            return [(server, prompt_id) for server, prompt_id in connection.execute(
                select(attempts.c.server, attempts.c.prompt_id).where(
                    attempts.c.job_id.in_(job_ids), attempts.c.outcome == "lease expired",
                    attempts.c.prompt_id.is_not(None)))]

    @_unavailable
    def try_lock(self, name: str, holder: str, seconds: float) -> bool:
        """A named lock for `seconds` (the reconciler's: one of many workers does the work of a round)."""
        now = db_now()
        with self.engine.begin() as connection:
            if connection.execute(update(locks).where(locks.c.name == name, or_(locks.c.until < now,
                                                                                 locks.c.holder == holder))
                                  .values(holder=holder, until=now + seconds)).rowcount:
                return True
            try:
                with connection.begin_nested():
                    connection.execute(insert(locks).values(name=name, holder=holder, until=now + seconds))
                return True
            except IntegrityError:
                return False

    @_unavailable
    def unlock(self, name: str, holder: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(locks).where(locks.c.name == name, locks.c.holder == holder).values(until=0.0))

    # -- status ----------------------------------------------------------------------------------------------
    @_unavailable
    def counts(self, batch_id: int) -> dict[str, int]:
        with self.reader.connect() as connection:
            found = dict(connection.execute(select(jobs.c.state, func.count()).where(jobs.c.batch_id == batch_id)
                                            .group_by(jobs.c.state)).all())
        return {state: found.get(state, 0) for state in ("queued", "running", "done", "failed", "cancelled")}

    @_unavailable
    def by_worker(self, batch_id: int) -> dict[str, dict]:
        """Per worker: done and failed counts and the jobs it runs now."""
        report: dict[str, dict] = {}
        with self.reader.connect() as connection:
            for worker, state, count in connection.execute(
                    select(jobs.c.worker, jobs.c.state, func.count())
                    .where(jobs.c.batch_id == batch_id, jobs.c.state.in_(("done", "failed")))
                    .group_by(jobs.c.worker, jobs.c.state)):
                report.setdefault(worker or "?", {"done": 0, "failed": 0, "running": []})[state] = count
            for worker, name in connection.execute(select(jobs.c.worker, jobs.c.name).where(
                    jobs.c.batch_id == batch_id, jobs.c.state == "running").order_by(jobs.c.name)):
                report.setdefault(worker or "?", {"done": 0, "failed": 0, "running": []})["running"].append(name)
        return report

    @_unavailable
    def failed(self, batch_id: int, limit: int | None = None) -> list[dict]:
        query = (select(jobs.c.name, jobs.c.error).where(jobs.c.batch_id == batch_id, jobs.c.state == "failed")
                 .order_by(jobs.c.name))
        with self.reader.connect() as connection:
            return [{"id": name, "error": error} for name, error in connection.execute(query.limit(limit))]

    # -- the service's view: one tenant's jobs --------------------------------------------------------------
    @_unavailable
    def batch_by_idempotency(self, tenant: str, key: str) -> dict | None:
        with self.reader.connect() as connection:
            row = connection.execute(select(batches).where(batches.c.tenant == tenant,
                                                           batches.c.idempotency_key == key)).mappings().first()
        return dict(row) if row else None

    def _tenant_jobs(self):
        return (select(jobs, batches.c.name.label("batch_name"), batches.c.uri.label("batch_uri"),
                       batches.c.url_expiry_s, batches.c.tenant)
                .join(batches, jobs.c.batch_id == batches.c.id))

    @_unavailable
    def tenant_job(self, tenant: str, public_id: str) -> dict | None:
        """A tenant's job by its public id (`public_job_id`); None for any other tenant's."""
        batch_name, _, job_name = public_id.partition(JOB_SEPARATOR)
        query = self._tenant_jobs().where(batches.c.tenant == tenant, batches.c.name == batch_name)
        if job_name:
            query = query.where(jobs.c.name == job_name)
        elif not batch_name.startswith(SINGLE_PREFIX):
            return None
        with self.reader.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row else None

    @_unavailable
    def tenant_jobs(self, tenant: str, state: str | None, limit: int, before: int | None,
                    batch_name: str | None = None, since: float | None = None,
                    until: float | None = None) -> list[dict]:
        """A tenant's jobs, newest first, `limit` of them from before job id `before` (a cursor), optionally of
        one batch and created in [since, until)."""
        query = self._tenant_jobs().where(batches.c.tenant == tenant).order_by(jobs.c.id.desc()).limit(limit)
        if state:
            query = query.where(jobs.c.state == state)
        if before is not None:
            query = query.where(jobs.c.id < before)
        if batch_name is not None:
            query = query.where(batches.c.name == batch_name)
        if since is not None:
            query = query.where(jobs.c.created_at >= since)
        if until is not None:
            query = query.where(jobs.c.created_at < until)
        with self.reader.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    @_unavailable
    def cancel(self, job_id: int) -> tuple[str, str | None, str | None] | None:
        """queued or running -> cancelled (a new token: the running attempt's writes are refused from now on)
        -> (the state it had, its ComfyUI server, its prompt id), or None when it had finished already."""
        now = db_now()
        with self.engine.begin() as connection:
            row = connection.execute(select(jobs.c.state, jobs.c.server, jobs.c.prompt_id).where(
                jobs.c.id == job_id).with_for_update()).first()
            if row is None or row.state not in ("queued", "running"):
                return None
            if connection.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == row.state)
                                  .values(state="cancelled", token=jobs.c.token + 1, lease_until=None,
                                          finished_at=now, error="cancelled")).rowcount != 1:
                return None
            connection.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.ended_at.is_(None))
                               .values(ended_at=now, outcome="cancelled", error="cancelled by its owner"))
            _emit(connection, job_id, "cancelled")
        return row.state, row.server, row.prompt_id

    @_unavailable
    def waiting(self, batch_id: int, limit: int | None = 50) -> list[dict]:
        """Queued jobs that were handed back, with the reason (an outage, a worker's refusal, a retry)."""
        query = (select(jobs.c.name, jobs.c.error).where(jobs.c.batch_id == batch_id, jobs.c.state == "queued",
                                                        jobs.c.error.is_not(None)).order_by(jobs.c.name))
        with self.reader.connect() as connection:
            return [{"id": name, "error": error} for name, error in connection.execute(query.limit(limit))]

    @_unavailable
    def job_rows(self, batch_id: int) -> list[dict]:
        with self.reader.connect() as connection:
            return [dict(row) for row in connection.execute(select(jobs).where(jobs.c.batch_id == batch_id)
                                                            .order_by(jobs.c.position)).mappings()]

    @_unavailable
    def attempt_rows(self, job_id: int) -> list[dict]:
        with self.reader.connect() as connection:
            return [dict(row) for row in connection.execute(select(attempts).where(attempts.c.job_id == job_id)
                                                            .order_by(attempts.c.id)).mappings()]

    @_unavailable
    def retry_failed(self, batch_id: int) -> int:
        """Failed jobs of a batch -> queued with fresh retries (an operator's decision, kept in the attempts)."""
        now = db_now()
        with self.engine.begin() as connection:
            ids = list(connection.execute(select(jobs.c.id, jobs.c.token).where(jobs.c.batch_id == batch_id,
                                                                               jobs.c.state == "failed")).all())
            for job_id, token in ids:
                connection.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "failed")
                                   .values(state="queued", failures=0, not_before=now, doorbell_at=None,
                                           error=None, finished_at=None))
                connection.execute(insert(attempts).values(job_id=job_id, token=token, started_at=now, ended_at=now,
                                                           outcome="retry-failed", error="queued again by --retry-failed"))
        return len(ids)

