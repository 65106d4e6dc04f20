"""0001_baseline: the whole schema of the release before Alembic (issue 14).

Tables: deployments (and its one-active-deployment-per-service partial unique index), revisions,
services, service_scale, tokens, token_policy, regions, join_tokens, audit_log,
audit_checkpoints; and the triggers that make the two audit tables append-only, in each
dialect's own words.

A database that release wrote has these tables but no ``alembic_version``: this revision then
creates only what is missing (a release older still may lack ``service_scale`` or the region
tables, which ``create_all`` used to add at start), so adopting it is the same as stamping it.
The table definitions are written out here, not imported: a migration is a fixed record of a
schema, the Table objects in ``store/`` and ``audit/`` move on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> list[sa.Table]:
    md = sa.MetaData()
    return [
        sa.Table(
            "deployments",
            md,
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("service", sa.String(63), nullable=False),
            sa.Column("region", sa.String(63), nullable=False),
            sa.Column("status", sa.String(32), nullable=False),
            sa.Column("active", sa.Boolean, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("doc", sa.Text, nullable=False),
            sa.Index("ix_deployments_service", "service", "created_at"),
            sa.Index(
                "ux_one_active_per_service",
                "service",
                "region",
                unique=True,
                sqlite_where=sa.text("active = 1"),
                postgresql_where=sa.text("active"),
            ),
        ),
        sa.Table(
            "revisions",
            md,
            sa.Column("id", sa.String(128), primary_key=True),
            sa.Column("service", sa.String(63), nullable=False),
            sa.Column("region", sa.String(63), nullable=False),
            sa.Column("deployment_id", sa.String(36), nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("spec", sa.Text, nullable=False),
        ),
        sa.Table(
            "services",
            md,
            sa.Column("service", sa.String(63), primary_key=True),
            sa.Column("region", sa.String(63), primary_key=True),
            sa.Column("serving_revision", sa.String(128)),
            sa.Column("warm_revision", sa.String(128)),
            sa.Column("warm_until", sa.Float),
            sa.Column("url", sa.String(256)),
        ),
        sa.Table(
            "service_scale",
            md,
            sa.Column("service", sa.String(63), primary_key=True),
            sa.Column("region", sa.String(63), primary_key=True),
            sa.Column("revision", sa.String(128), nullable=False),
            sa.Column("replicas", sa.Integer, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
        ),
        sa.Table(
            "tokens",
            md,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("subject", sa.String(200), nullable=False),
            sa.Column("permissions", sa.Text, nullable=False),
            sa.Column("issued_at", sa.Float, nullable=False),
            sa.Column("expires_at", sa.Float, nullable=False),
            sa.Column("issued_by", sa.String(256)),
            sa.Column("revoked_at", sa.Float),
            sa.Column("revoked_by", sa.String(256)),
        ),
        sa.Table(
            "token_policy",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("max_ttl_seconds", sa.Integer, nullable=False),
        ),
        sa.Table(
            "regions",
            md,
            sa.Column("name", sa.String(63), primary_key=True),
            sa.Column("agent_url", sa.String(300)),
            sa.Column("cert_serial", sa.String(64)),
            sa.Column("previous_serial", sa.String(64)),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("joined_at", sa.Float),
        ),
        sa.Table(
            "join_tokens",
            md,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("secret_sha256", sa.String(64), nullable=False),
            sa.Column("region", sa.String(63), nullable=False, index=True),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("expires_at", sa.Float, nullable=False),
            sa.Column("used_at", sa.Float),
        ),
        sa.Table(
            "audit_log",
            md,
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("timestamp", sa.String(40), nullable=False),
            sa.Column("event_type", sa.String(128), nullable=False),
            sa.Column("deployment_id", sa.String(128)),
            sa.Column("service", sa.String(128)),
            sa.Column("region", sa.String(128)),
            sa.Column("user", sa.String(256)),
            sa.Column("status", sa.String(64)),
            sa.Column("duration_ms", sa.BigInteger),
            sa.Column("detail", sa.Text, nullable=False),
            sa.Column("prev_hash", sa.String(64), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Index("ix_audit_log_deployment", "deployment_id", "seq"),
        ),
        sa.Table(
            "audit_checkpoints",
            md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("published_at", sa.String(40), nullable=False),
            sa.Column("witness", sa.String(1024), nullable=False),
            sa.Column("tree_size", sa.BigInteger, nullable=False),
            sa.Column("root_hash", sa.String(64), nullable=False),
            sa.Column("checkpoint", sa.Text, nullable=False),
            sa.Index("ix_audit_checkpoints_size", "tree_size"),
        ),
    ]


#: The append-only tables; a trigger per table and statement kind refuses the change.
APPEND_ONLY = ("audit_log", "audit_checkpoints")

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION shipyard_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only';
END
$$
"""


def _triggers(dialect: str) -> list[str]:
    ddl: list[str] = []
    if dialect == "postgresql":
        ddl.append(_PG_FUNCTION)
        for table in APPEND_ONLY:
            for kind in ("update", "delete"):
                ddl.append(
                    f"CREATE OR REPLACE TRIGGER {table}_no_{kind} BEFORE {kind.upper()} ON "
                    f"{table} FOR EACH ROW EXECUTE FUNCTION shipyard_append_only()"
                )
            ddl.append(
                f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION shipyard_append_only()"
            )
    else:
        for table in APPEND_ONLY:
            for kind in ("update", "delete"):
                ddl.append(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{kind} BEFORE {kind.upper()} ON "
                    f"{table} BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
    return ddl


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for table in _tables():
        if table.name not in existing:
            table.create(bind)
    for ddl in _triggers(bind.dialect.name):
        op.execute(ddl)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS shipyard_append_only() CASCADE")
    for table in reversed(_tables()):
        table.drop(bind, checkfirst=True)
