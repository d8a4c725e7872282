"""batches, jobs, attempts, locks

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("tenant", sa.String(128)),
        sa.Column("workflow", sa.JSON(), nullable=False),
        sa.Column("workflow_name", sa.String(256), nullable=False),
        sa.Column("workflow_digest", sa.String(64), nullable=False),
        sa.Column("schema", sa.JSON(), nullable=False),
        sa.Column("jobs_digest", sa.String(64), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("backoff_s", sa.Float(), nullable=False),
        sa.Column("url_expiry_s", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.UniqueConstraint("uri", name="uq_batches_uri"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("image_key", sa.String(1024)),
        sa.Column("image_sha256", sa.String(64)),
        sa.Column("audio_key", sa.String(1024)),
        sa.Column("audio_sha256", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("not_before", sa.Float(), nullable=False),
        sa.Column("lease_until", sa.Float()),
        sa.Column("doorbell_at", sa.Float()),
        sa.Column("worker", sa.String(256)),
        sa.Column("server", sa.String(1024)),
        sa.Column("prompt_id", sa.String(64)),
        sa.Column("staged_key", sa.String(1024)),
        sa.Column("output_key", sa.String(1024)),
        sa.Column("sha256", sa.String(64)),
        sa.Column("bytes", sa.BigInteger()),
        sa.Column("timings", sa.JSON()),
        sa.Column("lipsync", sa.JSON()),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float()),
        sa.Column("finished_at", sa.Float()),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_jobs_batch_id_batches"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("batch_id", "name", name="uq_jobs_batch_id_name"),
    )
    op.create_index("ix_jobs_batch_id_state", "jobs", ["batch_id", "state"])
    op.create_index("ix_jobs_state_not_before", "jobs", ["state", "not_before"])
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(256)),
        sa.Column("server", sa.String(1024)),
        sa.Column("prompt_id", sa.String(64)),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float()),
        sa.Column("outcome", sa.String(32)),
        sa.Column("error", sa.Text()),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_attempts_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
    )
    op.create_index("ix_attempts_job_id", "attempts", ["job_id"])
    op.create_table(
        "locks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_locks"),
    )


def downgrade() -> None:
    op.drop_table("locks")
    op.drop_index("ix_attempts_job_id", table_name="attempts")
    op.drop_table("attempts")
    op.drop_index("ix_jobs_state_not_before", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_state", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("batches")
