"""The job database (sonic/jobdb) on SQLite and on a real PostgreSQL server (Debian's, on loopback): the schema
Alembic builds, and every state change the fleet relies on — claims with fencing tokens, leases on the database's
clock, hand-backs that never fail a job for an outage, the reconciler's queries, status counts."""

from __future__ import annotations

import threading
import time

import pytest

from sonic.jobdb import JobDB
from sonic.jobdb.db import DatabaseUnavailable


_made = iter(range(10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        import sqlalchemy

        server = request.getfixturevalue("postgres")
        name = f"t{next(_made)}"
        admin = sqlalchemy.create_engine(server.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        url = server.url.rsplit("/", 1)[0] + f"/{name}"
    database = JobDB(url)
    database.upgrade()
    yield database
    database.close()


def batch(name="b1", retries=1, **extra):
    return {"name": name, "uri": f"s3://studio/renders/{name}", "workflow": {"1": {"class_type": "SonicLoadImage"}},
            "workflow_name": "w.json", "workflow_digest": "d" * 64, "schema": {}, "retries": retries,
            "backoff_s": 0.0, "url_expiry_s": 7200, **extra}


def rows(count=3):
    return [{"name": f"j{n}", "key": f"k{n}", "spec": {"id": f"j{n}", "params": {"seed": n}},
             "image_key": "s3://studio/in/p.png", "image_sha256": "a" * 64, "audio_key": "s3://studio/in/s.wav",
             "audio_sha256": "b" * 64} for n in range(count)]


def job_ids(database, batch_id):
    return [row["id"] for row in database.job_rows(batch_id)]


def test_the_migration_builds_exactly_the_tables_the_code_uses(db):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from sonic.jobdb.migrate import current, head
    from sonic.jobdb.schema import metadata

    with db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []
    assert current(db.engine) == head() == "0003"
    db.upgrade()  # again: nothing to do
    db.check_schema()


def test_an_old_database_is_upgraded_with_its_jobs(tmp_path):
    from sonic.jobdb.migrate import current, upgrade

    old = JobDB(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(old.engine, "0001")
    with pytest.raises(RuntimeError, match="is at schema version 0001, this code needs 0003"):
        old.check_schema()
    with old.engine.begin() as connection:  # a batch written by the previous version
        connection.exec_driver_sql(
            "INSERT INTO batches (name, uri, workflow, workflow_name, workflow_digest, schema, jobs_digest, retries, "
            "backoff_s, url_expiry_s, created_at) VALUES ('b0', 's3://x/b0', '{}', 'w', 'd', '{}', 'j', 2, 5, 60, 0)")
    old.upgrade()
    assert current(old.engine) == "0003" and old.batch("b0")["idempotency_key"] is None
    assert old.batch("b0")["webhook_url"] is None
    old.close()


def test_a_database_without_tables_says_which_command_makes_them(tmp_path):
    fresh = JobDB(f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(RuntimeError, match=r"has no job tables: run `python -m sonic db upgrade"):
        fresh.check_schema()
    fresh.close()


def test_a_batch_is_recorded_once(db):
    batch_id, created = db.create_batch(batch(), rows())
    assert created and db.counts(batch_id) == {"queued": 3, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    again, created = db.create_batch(batch(), rows())  # a re-submit of the same jobs: the same batch
    assert (again, created) == (batch_id, False) and len(job_ids(db, batch_id)) == 3
    with pytest.raises(ValueError, match="exists already with other jobs"):
        db.create_batch(batch(), rows(4))
    assert db.batch("s3://studio/renders/b1")["id"] == db.batch("b1")["id"] == batch_id
    with pytest.raises(ValueError, match="no batch"):
        db.batch("nope")


def test_claims_are_fenced_and_leases_run_on_the_database_clock(db):
    batch_id, _ = db.create_batch(batch(), rows(1))
    (job,) = job_ids(db, batch_id)
    first = db.claim(job, "w1", "http://a", lease_s=4.0)
    assert first.token == 1 and first.attempts == 1 and first.batch["uri"] == "s3://studio/renders/b1"
    assert db.note_prompt(job, first.token, "prompt-a")
    refused = db.claim(job, "w2", "http://b", lease_s=4.0)
    assert isinstance(refused, str) and refused.startswith("running on w1 under a lease")
    time.sleep(4.3)  # the lease lapses: w1 stopped renewing it
    second = db.claim(job, "w2", "http://b", lease_s=30.0)
    assert second.token == 2 and second.attempts == 2 and second.taken_over == [("http://a", "prompt-a")]
    # everything the first attempt says from now on is refused and changes nothing
    assert not db.heartbeat(job, first.token, 30.0)
    assert not db.stage(job, first.token, "s3://x/attempts/j0.1.mp4", "1" * 64, 10)
    assert not db.finish(job, first.token, "done", output_key="s3://x/j0.mp4", sha256="1" * 64, bytes=10)
    assert db.heartbeat(job, second.token, 30.0)
    assert db.stage(job, second.token, "s3://x/attempts/j0.2.mp4", "2" * 64, 20)
    assert not db.stage(job, second.token, "s3://x/attempts/j0.2b.mp4", "3" * 64, 30)  # staged once
    assert db.finish(job, second.token, "done", output_key="s3://x/j0.mp4", sha256="2" * 64, bytes=20)
    (row,) = db.job_rows(batch_id)
    assert (row["state"], row["sha256"], row["worker"], row["staged_key"]) == \
        ("done", "2" * 64, "w2", "s3://x/attempts/j0.2.mp4")
    trail = [(a["token"], a["worker"], a["outcome"]) for a in db.attempt_rows(job)]
    assert trail == [(1, "w1", "lease expired"), (2, "w2", "done")]
    assert db.claim(job, "w3", "http://c", 30.0) == "already done"


def test_of_many_simultaneous_claims_exactly_one_wins(db):
    batch_id, _ = db.create_batch(batch(), rows(1))
    (job,) = job_ids(db, batch_id)
    results, gate = [], threading.Barrier(6)

    def claim(n):
        gate.wait()
        results.append(db.claim(job, f"w{n}", "http://a", 30.0))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [r for r in results if not isinstance(r, str)]
    assert len(results) == 6 and len(won) == 1 and won[0].token == 1


def test_outages_never_fail_a_job_its_own_failures_use_its_retries(db):
    batch_id, _ = db.create_batch(batch(retries=1), rows(2))
    outage, own = job_ids(db, batch_id)
    for attempt in range(4):  # the store was down four times: handed back each time, never failed
        claim = db.claim(outage, "w1", "http://a", 30.0)
        assert claim.token == attempt + 1
        assert db.release(outage, claim.token, "store unreachable", 0.0, job_failure=False) == "queued"
    claim = db.claim(own, "w1", "http://a", 30.0)
    assert db.release(own, claim.token, "out of memory", 0.0, job_failure=True) == "queued"  # one retry
    claim = db.claim(own, "w1", "http://a", 30.0)
    assert db.release(own, claim.token, "out of memory", 0.0, job_failure=True) == "failed"
    assert db.release(own, claim.token, "again", 0.0, job_failure=True) is None  # not held any more
    assert db.counts(batch_id)["failed"] == 1 and db.counts(batch_id)["queued"] == 1
    assert db.failed(batch_id) == [{"id": "j1", "error": "out of memory (gave up after 2 failed attempts)"}]
    assert {r["name"]: r["failures"] for r in db.job_rows(batch_id)} == {"j0": 0, "j1": 2}
    assert db.retry_failed(batch_id) == 1 and db.counts(batch_id)["queued"] == 2
    assert [a["outcome"] for a in db.attempt_rows(own)] == ["retry", "retry", "retry-failed"]
    claim = db.claim(own, "w1", "http://a", 30.0)  # its retries are fresh again
    assert db.release(own, claim.token, "out of memory", 0.0, job_failure=True) == "queued"


def ids_of(pairs):
    return [job_id for job_id, _ in pairs]


def test_the_reconcilers_queries(db):
    batch_id, _ = db.create_batch(batch(), rows(3))
    a, b, c = job_ids(db, batch_id)
    assert ids_of(db.due(batch_id=batch_id)) == [a, b, c]  # new: never rung
    db.rang(db.due())
    assert db.due() == [] and db.silent(grace_s=2.0, limit=10) == []
    claim = db.claim(a, "w1", "http://a", lease_s=2.0)  # w1 will die
    other = db.claim(b, "w2", "http://b", lease_s=30.0)
    assert db.release(b, other.token, "store unreachable", delay_s=2.5, job_failure=False) == "queued"
    assert db.due() == []  # in its backoff
    assert isinstance(db.claim(b, "w3", "http://c", 30.0), str)  # not claimable before its backoff ends either
    live = db.claim(c, "w4", "http://d", lease_s=30.0)  # a live lease: not expired
    time.sleep(2.7)
    assert db.expire_leases() == [a]
    assert db.release(c, live.token, "store unreachable", 0.0, job_failure=False) == "queued"
    assert ids_of(db.due()) == [a, b, c]  # the lapsed job and those whose backoff ended
    assert ids_of(db.silent(grace_s=2.0, limit=10)) == [a, b, c]  # their messages are older than the grace
    db.rang(db.due())
    assert db.due() == []
    # the old holder of a, whose lease the reconciler expired: everything it says is refused, its trail kept
    assert not db.heartbeat(a, claim.token, 30.0) and not db.stage(a, claim.token, "s3://x/a.1.mp4", "1" * 64, 1)
    assert db.release(a, claim.token, "store unreachable", 0.0, job_failure=False) is None
    assert not db.finish(a, claim.token, "done", output_key="s3://x/a.mp4", sha256="1" * 64, bytes=1)
    assert not db.note_prompt(a, claim.token, "prompt-1")  # refused for the job; kept in its attempt
    assert next(r for r in db.job_rows(batch_id) if r["id"] == a)["prompt_id"] is None
    retaken = db.claim(a, "w2", "http://b", 30.0)
    assert retaken.token == 2 and retaken.taken_over == [("http://a", "prompt-1")]  # to interrupt there
    assert [(t["token"], t["outcome"]) for t in db.attempt_rows(a)] == [(1, "lease expired"), (2, None)]


def test_a_job_handed_back_while_its_message_was_being_marked_is_rung_again(db):
    """The reconciler reads a due job, rings it; a worker takes the message at once and hands the job back with
    a backoff; only then does the reconciler mark it rung. The job still owes a message after its backoff."""
    batch_id, _ = db.create_batch(batch(), rows(1))
    seen = db.due(batch_id=batch_id)
    (job,) = ids_of(seen)
    claim = db.claim(job, "w1", "http://a", 30.0)  # the worker got the message before `rang`
    assert db.release(job, claim.token, "ComfyUI does not answer", delay_s=0.0, job_failure=False) == "queued"
    db.rang(seen)  # marks nothing: the job changed since it was read
    assert ids_of(db.due()) == [job]
    db.rang(db.due())
    assert db.due() == []


def test_one_reconciler_at_a_time(db):
    assert db.try_lock("reconciler", "w1", 0.5)
    assert db.try_lock("reconciler", "w1", 0.5)  # its holder renews it
    assert not db.try_lock("reconciler", "w2", 0.5)
    time.sleep(0.6)
    assert db.try_lock("reconciler", "w2", 30.0)
    db.unlock("reconciler", "w1")  # not its holder: nothing changes
    assert not db.try_lock("reconciler", "w3", 30.0)
    db.unlock("reconciler", "w2")  # a failed round gives the lock up at once
    assert db.try_lock("reconciler", "w3", 30.0)


def test_status_counts_per_worker(db):
    batch_id, _ = db.create_batch(batch(), rows(3))
    a, b, c = job_ids(db, batch_id)
    db.finish(a, db.claim(a, "w1", "http://a", 30.0).token, "done", output_key="k", sha256="s", bytes=1)
    db.finish(b, db.claim(b, "w2", "http://b", 30.0).token, "failed", error="NoFaceError: no face")
    db.claim(c, "w1", "http://a", 30.0)
    assert db.by_worker(batch_id) == {"w1": {"done": 1, "failed": 0, "running": ["j2"]},
                                      "w2": {"done": 0, "failed": 1, "running": []}}
    assert db.counts(batch_id) == {"queued": 0, "running": 1, "done": 1, "failed": 1, "cancelled": 0}


def test_an_unreachable_database_is_one_line_without_its_password():
    from servers import free_port

    db = JobDB(f"postgresql://sonic:hunter2@127.0.0.1:{free_port()}/sonic")
    with pytest.raises(DatabaseUnavailable) as caught:
        db.claim(1, "w1", "http://a", 30.0)
    text = str(caught.value)
    assert "hunter2" not in text and "***" in text and "SONIC_DATABASE_URL" in text and "\n" not in text
