"""Alembic's entry point for the job database. Run through `sonic.jobdb.migrate` (which hands over an open
connection) or `python -m sonic db upgrade`; the `alembic` command works too with `-x url=<database URL>`."""

from alembic import context
from sqlalchemy import create_engine

config = context.config
metadata = config.attributes.get("metadata")
if metadata is None:  # the alembic command line, for developers: sonic must be importable
    from sonic.jobdb.schema import metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
