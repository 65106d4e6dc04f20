"""App secrets (issue 16): ``app_secrets``, one row per version of a service's secret, its value
sealed with the key in ``<shared_dir>/keys/secrets.key`` (``store/secrets.py``).

Revision ID: 0004_secrets
Revises: 0003_leases
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_secrets"
down_revision = "0003_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("service", sa.String(63), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("deleted_at", sa.Float),
        sa.Column("deleted_by", sa.String(256)),
    )
    op.create_index(
        "ux_app_secrets_version", "app_secrets", ["service", "name", "version"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_app_secrets_version", table_name="app_secrets")
    op.drop_table("app_secrets")
