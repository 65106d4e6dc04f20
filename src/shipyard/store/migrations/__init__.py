"""Alembic migrations of the store's schema, run by ``store.engine.upgrade`` (no alembic.ini:
``engine.alembic_config``). Revision ids are fixed names (``0001_baseline``, ``0002_audit_head``,
...); each file says what its revision adds and why."""
