"""The job database's schema version: upgrade to what this code needs, or say what to run."""

from __future__ import annotations

from pathlib import Path

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
UPGRADE_LOCK = 0x50E1C  # PostgreSQL advisory lock held while the schema is upgraded


def _config():
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine, revision: str = "head") -> None:
    from alembic import command

    from .schema import metadata

    config = _config()
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE (see db.py) already serializes upgrades
        if connection.dialect.name == "postgresql":  # two workers starting on a new database: one creates, one waits
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK})")
        config.attributes["connection"] = connection
        config.attributes["metadata"] = metadata
        command.upgrade(config, revision)


def check(engine, url_text: str) -> None:
    """Raise when the database is not at this code's version (naming the command that fixes it)."""
    found, wanted = current(engine), head()
    if found != wanted:
        state = "has no job tables" if found is None else f"is at schema version {found}, this code needs {wanted}"
        raise RuntimeError(f"the job database {url_text} {state}: run `python -m sonic db upgrade --database URL` "
                           "(or start a worker or submit a batch: they create the tables of a new database)")
