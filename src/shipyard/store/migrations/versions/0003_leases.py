"""Leases, durable commands and active regions (issue 14, several control-plane replicas).

``leases`` (who drives each active deployment, and the janitor, with a fencing token),
``deployment_commands`` (promote / abort given to any replica, applied by the driver) and
``active_regions`` (one row per region of every active deployment: one deployment per service
across replicas). Active deployments of an earlier release get their ``active_regions`` rows
here; they have no lease, so the first replica to start takes them over.

Revision ID: 0003_leases
Revises: 0002_audit_head
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003_leases"
down_revision = "0002_audit_head"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    if sa.inspect(conn).has_table("leases"):
        # Made by ``create_all`` of the branch before migrations (ha-lease alone): nothing to do
        # but fill in ``active_regions``, which that made empty on older databases.
        _backfill(conn, sa.Table("active_regions", sa.MetaData(), autoload_with=conn))
        return
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "deployment_commands",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("token_id", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("taken_at", sa.Float),
        sa.Column("taken_by", sa.String(255)),
    )
    op.create_index(
        "ix_deployment_commands_pending", "deployment_commands", ["deployment_id", "taken_at"]
    )
    active_regions = op.create_table(
        "active_regions",
        sa.Column("service", sa.String(63), primary_key=True),
        sa.Column("region", sa.String(63), primary_key=True),
        sa.Column("deployment_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_active_regions_deployment", "active_regions", ["deployment_id"])
    _backfill(conn, active_regions)


def _backfill(conn: sa.Connection, active_regions: sa.Table) -> None:
    """A row per region of every active deployment that has none yet."""
    seen = {
        (r[0], r[1])
        for r in conn.execute(sa.select(active_regions.c.service, active_regions.c.region))
    }
    rows = []
    for dep_id, service, region, doc in conn.execute(
        sa.text("SELECT id, service, region, doc FROM deployments WHERE active ORDER BY created_at")
    ):
        try:
            regions = json.loads(doc).get("regions") or [region]
        except (ValueError, AttributeError):
            regions = [region]
        for r in regions:
            if (service, r) not in seen:
                seen.add((service, r))
                rows.append({"service": service, "region": r, "deployment_id": dep_id})
    if rows:
        op.bulk_insert(active_regions, rows)


def downgrade() -> None:
    op.drop_index("ix_active_regions_deployment", table_name="active_regions")
    op.drop_table("active_regions")
    op.drop_index("ix_deployment_commands_pending", table_name="deployment_commands")
    op.drop_table("deployment_commands")
    op.drop_table("leases")
