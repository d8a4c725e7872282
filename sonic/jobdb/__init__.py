"""The job database: the single source of truth for fleet batches (and the coming HTTP service).

SQLAlchemy 2 Core over a SQLite file (one machine; several workers share it in WAL mode) or PostgreSQL (many
machines), chosen by URL (`--database` / SONIC_DATABASE_URL). The schema is versioned with Alembic
(`migrations/`); `python -m sonic db upgrade` brings a database to the version this code needs.

- `schema`: the tables (batches, jobs, the append-only attempts audit trail, named locks) and the database clock
- `db`: every state change as one conditional statement: submit, claim with a fencing token, heartbeat, stage and
  finish (accepted only from the token holder), release, lease expiry, the reconciler's queries, status counts
- `migrate`: upgrade and the version check
Nothing here imports torch or ComfyUI.
"""

from .db import Claim, JobDB, database_url

__all__ = ["Claim", "JobDB", "database_url"]
