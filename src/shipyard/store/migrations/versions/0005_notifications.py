"""Notification sinks and the durable outbox (issue 16, ``store/outbox.py``).

``notification_sinks``: where notifications go (webhook URL and sealed HMAC key, or a sealed
Slack incoming-webhook URL; an event filter). ``notification_outbox``: one row per event and
sink, written in the audit record's transaction and delivered at least once by the workers of
``notify/delivery.py``.

Revision ID: 0005_notifications
Revises: 0004_secrets
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_notifications"
down_revision = "0004_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_sinks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("url_sealed", sa.LargeBinary),
        sa.Column("secret_sealed", sa.LargeBinary),
        sa.Column("events", sa.Text, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
    )
    op.create_table(
        "notification_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(36), nullable=False, unique=True),
        sa.Column("sink_id", sa.String(36), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("audit_seq", sa.Integer),
        sa.Column("deployment_id", sa.String(36)),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claimed_until", sa.Float),
        sa.Column("last_error", sa.String(512)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("delivered_at", sa.Float),
    )
    op.create_index(
        "ix_notification_outbox_due", "notification_outbox", ["state", "next_attempt_at"]
    )
    op.create_index(
        "ix_notification_outbox_deployment", "notification_outbox", ["deployment_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_notification_outbox_deployment", table_name="notification_outbox")
    op.drop_index("ix_notification_outbox_due", table_name="notification_outbox")
    op.drop_table("notification_outbox")
    op.drop_table("notification_sinks")
