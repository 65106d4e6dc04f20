"""A control-plane replica's audit writer, as its own process: ``python -m
tests.audit.append_worker DATABASE_URL DATA_DIR COUNT NAME`` appends COUNT records to the
store's chain with DATA_DIR's anchor, then prints ``done``. Used by test_log_postgres.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from shipyard.audit import ANCHOR_FILENAME, AuditEvent, SqlAuditLog
from shipyard.store.engine import open_engine


async def _append(log: SqlAuditLog, count: int, name: str) -> None:
    for n in range(count):
        await log.append(AuditEvent("test.appended", user=name, detail={"n": n}))


def main() -> None:
    database, data_dir, count, name = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    engine = open_engine(database, data_dir)
    try:
        asyncio.run(_append(SqlAuditLog(engine, data_dir / ANCHOR_FILENAME), count, name))
    finally:
        engine.dispose()
    print("done", flush=True)


if __name__ == "__main__":
    main()
