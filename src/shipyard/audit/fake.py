"""``MemoryAuditLog``: the in-memory ``AuditLog`` for orchestrator and API unit tests.

It keeps the same contract as ``SqlAuditLog`` (same validation, seq numbering, hash chain, log
line, ``records`` filtering and ``verify``); tests/audit/test_log.py runs one contract suite
against both. It has no anchor: nothing outside the process to tamper with.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from shipyard.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    StoredRow,
    VerifyReport,
    emit_log,
    make_row,
    to_record,
    verify_rows,
)
from shipyard.errors import InvalidInput


class MemoryAuditLog:
    """``AuditLog`` held in a list; ``rows`` is exposed so tests can inspect or tamper with it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.rows: list[StoredRow] = []

    async def append(self, event: AuditEvent) -> AuditRecord:
        # No await between reading the head and appending: one event loop cannot interleave.
        head = self.rows[-1] if self.rows else None
        timestamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        row = make_row(
            head.seq + 1 if head else 1, timestamp, event, head.hash if head else GENESIS_HASH
        )
        self.rows.append(row)
        record = to_record(row)
        emit_log(record)
        return record

    async def records(
        self, *, deployment_id: str | None = None, limit: int | None = None
    ) -> list[AuditRecord]:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise InvalidInput(f"limit must be a non-negative integer, not {limit!r}")
        rows = [r for r in self.rows if deployment_id is None or r.deployment_id == deployment_id]
        if limit is not None:
            rows = rows[len(rows) - limit :] if limit else []
        return [to_record(r) for r in rows]

    def verify(self) -> VerifyReport:
        return verify_rows(sorted(self.rows, key=lambda r: r.seq), anchor=None)
