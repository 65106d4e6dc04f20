"""The migration scripts, one per revision (Alembic loads them by path)."""
