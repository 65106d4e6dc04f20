"""The tamper-evident audit trail (ADR section 10): every deployment action, hash-chained.

``chain`` holds the data and the hash chain, ``log`` the ``AuditLog`` protocol and its SQLite
backend plus the CLI's read-only access, ``fake`` the in-memory log for tests.
"""

from shipyard.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    CorruptRecord,
    VerifyReport,
)
from shipyard.audit.fake import MemoryAuditLog
from shipyard.audit.log import (
    ANCHOR_FILENAME,
    AuditLog,
    SqlAuditLog,
    read_records,
    verify_database,
)

__all__ = [
    "ANCHOR_FILENAME",
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "CorruptRecord",
    "MemoryAuditLog",
    "SqlAuditLog",
    "VerifyReport",
    "read_records",
    "verify_database",
]
