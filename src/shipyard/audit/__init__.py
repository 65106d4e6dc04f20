"""The tamper-evident audit trail (ADR section 10): every deployment action, hash-chained, and a
transparency log over it.

``chain`` holds the data and the hash chain, ``log`` the ``AuditLog`` protocol and its SQLite
backend plus the CLI's read-only access, ``fake`` the in-memory log for tests. ``merkle`` (RFC
9162 tree and proofs), ``checkpoint`` (C2SP signed checkpoints), ``publishing`` (checkpoints to
witnesses, ``shipyard serve --witness``) and ``proving`` (``audit verify --checkpoint``, ``audit
prove``) make the trail checkable against copies kept outside the data directory.
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
