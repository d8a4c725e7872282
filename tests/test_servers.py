"""The test servers themselves (tests/servers.py): PostgreSQL answers through SQLAlchemy, keeps its port and data
across restart() and kill(), and leaves no process behind; the S3 server comes back on the same port with its
objects after stop() or kill()."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import servers
from servers import PostgreSQL, S3Server, skip_or_fail


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_postgresql_query_restart_kill_stop(tmp_path, monkeypatch):
    try:
        import sqlalchemy
        from sqlalchemy.pool import NullPool
    except ImportError:
        skip_or_fail("sqlalchemy not installed: pip install sqlalchemy 'psycopg[binary]'", "SONIC_REQUIRE_COMFYUI")
    pg = PostgreSQL(tmp_path / "pg")
    # the first port it is given is somebody else's by the time it binds: it retries on another
    taken = socket.create_server(("127.0.0.1", 0))
    taken_port = taken.getsockname()[1]
    ports = [taken_port]
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: ports.pop() if ports else real_free_port())
    started = time.time()
    try:
        pg.start()
        first_start = time.time() - started
        assert pg.port != taken_port and "Address already in use" in pg.log_path.read_text()
        taken.close()
        running = pg.pids()
        assert pg.process.pid in running and len(running) > 1  # the postmaster and its children
        if os.geteuid() == 0:
            import pwd

            assert _uid(pg.process.pid) == pwd.getpwnam("postgres").pw_uid
        url, port = pg.url, pg.port
        assert url == f"postgresql+psycopg://sonic@127.0.0.1:{port}/sonic"

        def values(insert=None):
            engine = sqlalchemy.create_engine(pg.url, poolclass=NullPool)
            try:
                with engine.begin() as connection:
                    if insert is not None:
                        connection.execute(sqlalchemy.text("INSERT INTO t VALUES (:x)"), {"x": insert})
                    return connection.execute(sqlalchemy.text("SELECT x FROM t ORDER BY x")).scalars().all()
            finally:
                engine.dispose()

        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        with engine.begin() as connection:
            assert connection.execute(sqlalchemy.text("SELECT current_database(), current_user")).one() == \
                ("sonic", "sonic")
            connection.execute(sqlalchemy.text("CREATE TABLE t (x integer)"))
            connection.execute(sqlalchemy.text("INSERT INTO t VALUES (42)"))
        engine.dispose()

        started = time.time()
        pg.restart()
        restart = time.time() - started
        assert (pg.url, pg.port) == (url, port) and values() == [42]
        assert values(insert=43) == [42, 43]  # committed after the last checkpoint: the crash below keeps it

        old = pg.process.pid
        pg.kill()
        assert pg.process.returncode == -9 and not pg.pids() and _refused(port)
        started = time.time()
        pg.start()  # crash recovery from the WAL, on the same port
        after_kill = time.time() - started
        assert pg.process.pid != old and pg.url == url and values() == [42, 43]
        assert "automatic recovery in progress" in pg.log_path.read_text()

        pg.stop()
        assert pg.process.returncode == 0 and not pg.pids() and _refused(port)
        print(f"postgres: first start {first_start:.2f} s (initdb, a taken port, createdb), "
              f"restart {restart:.2f} s, start after kill {after_kill:.2f} s")
    finally:
        taken.close()
        pg.close()
    assert not pg.pids()
    if pg.root != pg.folder:
        assert not pg.root.exists()  # the private folder
    assert pg.log_path.is_file()


def test_s3_server_stop_and_kill_then_start_on_the_same_port(tmp_path):
    s3 = S3Server(tmp_path / "s3", ("bucket",))
    try:
        client = s3.client()
        client.put_object(Bucket="bucket", Key="a/b.txt", Body=b"kept")
        port, endpoint = s3.port, s3.endpoint
        for down in (s3.stop, s3.kill):
            down()
            assert s3.process.returncode is not None and _refused(port)
            s3.start()
            assert (s3.port, s3.endpoint, s3.env["SONIC_S3_ENDPOINT"]) == (port, endpoint, endpoint)
            # the client made before the outage works again, and the object is still there
            assert client.get_object(Bucket="bucket", Key="a/b.txt")["Body"].read() == b"kept"
        client.put_object(Bucket="bucket", Key="c.txt", Body=b"new")
        assert (tmp_path / "s3" / "bucket" / "c.txt").read_bytes() == b"new"
    finally:
        s3.stop()
    assert s3.process.poll() is not None
