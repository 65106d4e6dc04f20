"""0002_audit_head: the audit chain's head in one row, the lock that serialises appends.

``audit_head(id=1, seq, hash)`` holds the newest record's seq and hash. ``SqlAuditLog.append``
locks this row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` locks the
whole file anyway), reads the previous record from it, inserts the next and moves it, all in one
transaction: several replicas writing one chain cannot read the same head and fork it. Filled
here from the chain as it stands (seq 0 and the genesis hash for an empty trail).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_audit_head"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

GENESIS_HASH = "0" * 64


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("audit_head"):
        # A SQLite upgrade cut short after this DDL (it commits as it goes): the table and its
        # row are there, only the version stamp is missing.
        return
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_head_one_row"),
    )
    newest = (
        op.get_bind()
        .execute(sa.text("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"))
        .first()
    )
    seq, digest = (int(newest[0]), str(newest[1])) if newest else (0, GENESIS_HASH)
    op.bulk_insert(head, [{"id": 1, "seq": seq, "hash": digest}])


def downgrade() -> None:
    op.drop_table("audit_head")
