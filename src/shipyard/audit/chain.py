"""The audit trail's data and its hash chain: events, records, canonical form, verification.

Shared by the two ``AuditLog`` backends (``log.SqlAuditLog``, ``fake.MemoryAuditLog``) and by
``shipyard audit verify``. Nothing here does I/O except ``emit_log`` (one JSON log line).

Record ``n`` stores ``hash = sha256(prev_hash || canonical(n))`` where ``prev_hash`` is record
``n-1``'s hash (``GENESIS_HASH`` for seq 1) and ``canonical`` is the JSON of seq plus every ADR
section 10 field and ``detail``: sorted keys, no whitespace, the timestamp as ISO-8601 UTC with
microseconds. Editing, deleting, reordering or renumbering a record breaks the recomputed hash or
the link at (or right after) that record; deleting the newest records is caught by the anchor
(the last seq and hash, kept outside the database).

The chain alone cannot stop someone who may write both the database and the anchor: they re-hash
everything after an edit. That is what the Merkle tree and the checkpoints published outside the
data directory are for (merkle.py, checkpoint.py, publishing.py); a record's leaf in that tree is
``leaf_data``, the same bytes its chain hash covers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shipyard import logs
from shipyard.audit import merkle
from shipyard.errors import InvalidInput, PermanentError

GENESIS_HASH = "0" * 64
_logger = logging.getLogger("shipyard.audit")

#: The ADR section 10 fields an event carries besides its type (all optional).
_OPTIONAL_TEXT = ("deployment_id", "service", "region", "user", "status")


@dataclass(frozen=True)
class AuditEvent:
    """What happened: ADR section 10's fields, plus ``detail`` (a JSON object) for the rest."""

    event_type: str
    deployment_id: str | None = None
    service: str | None = None
    region: str | None = None
    user: str | None = None
    status: str | None = None
    duration_ms: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    """One stored, chained event. ``timestamp`` is UTC; ``detail`` is plain JSON data."""

    seq: int
    timestamp: dt.datetime
    event_type: str
    deployment_id: str | None
    service: str | None
    region: str | None
    user: str | None
    status: str | None
    duration_ms: int | None
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the timestamp as an ISO-8601 UTC string, ``detail`` as a fresh dict."""
        return {
            "seq": self.seq,
            "timestamp": format_timestamp(self.timestamp),
            "event_type": self.event_type,
            "deployment_id": self.deployment_id,
            "service": self.service,
            "region": self.region,
            "user": self.user,
            "status": self.status,
            "duration_ms": self.duration_ms,
            "detail": json.loads(json.dumps(self.detail)),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of checking a trail: ``first_bad_seq`` and ``reason`` say where and why."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Anchor:
    """The newest record's seq and hash, kept outside the database (``<data_dir>/audit.head``)."""

    seq: int
    hash: str


@dataclass(frozen=True)
class StoredRow:
    """A record exactly as a backend stores it (timestamp and detail as canonical text)."""

    seq: int
    timestamp: str
    event_type: str
    deployment_id: str | None
    service: str | None
    region: str | None
    user: str | None
    status: str | None
    duration_ms: int | None
    detail: str
    prev_hash: str
    hash: str


# --- canonical form ------------------------------------------------------------------------------


def format_timestamp(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).isoformat(timespec="microseconds")


def parse_timestamp(text: str) -> dt.datetime:
    ts = dt.datetime.fromisoformat(text)
    if ts.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return ts.astimezone(dt.UTC)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, no NaN/Infinity: the same data always gives the same text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def compute_hash(prev_hash: str, seq: int, timestamp: dt.datetime, event: AuditEvent) -> str:
    """``sha256(prev_hash || canonical JSON of seq and every field)`` as hex."""
    return hashlib.sha256(_preimage(prev_hash, seq, timestamp, event)).hexdigest()


def leaf_data(record: AuditRecord) -> bytes:
    """The record as a leaf of the Merkle tree (merkle.py): the very bytes whose SHA-256 is its
    chain hash, ``prev_hash`` (64 ASCII hex digits) then the canonical JSON, UTF-8. So the tree
    commits to each record's contents *and* its link, and a verifier holding ``leaf_data`` can
    check both ``hash`` and the leaf hash ``SHA-256(0x00 || leaf_data)``."""
    return _preimage(record.prev_hash, record.seq, record.timestamp, _event_of(record))


def _preimage(prev_hash: str, seq: int, timestamp: dt.datetime, event: AuditEvent) -> bytes:
    payload = {
        "seq": seq,
        "timestamp": format_timestamp(timestamp),
        "event_type": event.event_type,
        "deployment_id": event.deployment_id,
        "service": event.service,
        "region": event.region,
        "user": event.user,
        "status": event.status,
        "duration_ms": event.duration_ms,
        "detail": event.detail,
    }
    return (prev_hash + canonical_json(payload)).encode()


def check_event(event: AuditEvent) -> str:
    """Validate an event before it is stored; returns ``detail`` as canonical JSON text."""
    if not isinstance(event.event_type, str) or not event.event_type.strip():
        raise InvalidInput("audit event_type must be a non-empty string")
    for name in _OPTIONAL_TEXT:
        value = getattr(event, name)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(
                f"audit field {name} must be a string or None, not {type(value).__name__}"
            )
    d = event.duration_ms
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
        raise InvalidInput(f"audit duration_ms must be a non-negative integer or None, not {d!r}")
    # json.dumps would quietly turn {1: ...} into {"1": ...}, which then reads back differently.
    if not isinstance(event.detail, Mapping) or not _keys_are_strings(event.detail):
        raise InvalidInput("audit detail must be a JSON object with string keys")
    try:
        return canonical_json(dict(event.detail))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"audit detail must be plain JSON data: {exc}") from exc


def _keys_are_strings(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _keys_are_strings(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_keys_are_strings(v) for v in value)
    return True


def make_row(seq: int, timestamp: dt.datetime, event: AuditEvent, prev_hash: str) -> StoredRow:
    """The next row to store: validated, normalised, hashed onto ``prev_hash``."""
    detail_json = check_event(event)
    # Hash exactly what reads back: the timestamp at microseconds, detail as parsed JSON.
    ts = parse_timestamp(format_timestamp(timestamp))
    normalised = dataclasses.replace(event, detail=json.loads(detail_json))
    return StoredRow(
        seq=seq,
        timestamp=format_timestamp(ts),
        event_type=event.event_type,
        deployment_id=event.deployment_id,
        service=event.service,
        region=event.region,
        user=event.user,
        status=event.status,
        duration_ms=event.duration_ms,
        detail=detail_json,
        prev_hash=prev_hash,
        hash=compute_hash(prev_hash, seq, ts, normalised),
    )


class CorruptRecord(PermanentError):
    """A stored row cannot even be parsed (a column holds the wrong kind of value)."""

    code = "audit_record_corrupt"


def to_record(row: StoredRow) -> AuditRecord:
    """Parse a stored row; ``CorruptRecord`` if a column holds the wrong kind of value."""
    if isinstance(row.seq, bool) or not isinstance(row.seq, int):
        raise CorruptRecord(f"seq is not an integer: {row.seq!r}", seq=row.seq)
    if not isinstance(row.event_type, str):
        raise CorruptRecord("event_type is not text", seq=row.seq)
    for name in _OPTIONAL_TEXT:
        if getattr(row, name) is not None and not isinstance(getattr(row, name), str):
            raise CorruptRecord(f"{name} is not text", seq=row.seq)
    if row.duration_ms is not None and (
        isinstance(row.duration_ms, bool) or not isinstance(row.duration_ms, int)
    ):
        raise CorruptRecord("duration_ms is not an integer", seq=row.seq)
    if not isinstance(row.prev_hash, str) or not isinstance(row.hash, str):
        raise CorruptRecord("prev_hash/hash is not text", seq=row.seq)
    try:
        ts = parse_timestamp(row.timestamp)
    except (TypeError, ValueError) as exc:
        raise CorruptRecord(
            f"timestamp is not an ISO-8601 UTC time: {row.timestamp!r}", seq=row.seq
        ) from exc
    try:
        detail = json.loads(row.detail)
    except (TypeError, ValueError) as exc:
        raise CorruptRecord("detail is not valid JSON", seq=row.seq) from exc
    if not isinstance(detail, dict):
        raise CorruptRecord("detail is not a JSON object", seq=row.seq)
    return AuditRecord(
        seq=row.seq,
        timestamp=ts,
        event_type=row.event_type,
        deployment_id=row.deployment_id,
        service=row.service,
        region=row.region,
        user=row.user,
        status=row.status,
        duration_ms=row.duration_ms,
        detail=detail,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _event_of(record: AuditRecord) -> AuditEvent:
    return AuditEvent(
        event_type=record.event_type,
        deployment_id=record.deployment_id,
        service=record.service,
        region=record.region,
        user=record.user,
        status=record.status,
        duration_ms=record.duration_ms,
        detail=record.detail,
    )


class ChainBroken(PermanentError):
    """A record that is not the next intact link of the chain (``check_next``)."""

    code = "audit_chain_broken"


def check_next(row: StoredRow, expected_seq: int, prev_hash: str) -> tuple[AuditRecord, bytes]:
    """The record in ``row`` and its Merkle leaf hash if it is record ``expected_seq``, linked to
    ``prev_hash`` and hashed right; ChainBroken saying why not. The checkpoint publisher walks
    new records with it."""
    if row.seq != expected_seq:
        raise ChainBroken(
            f"record {expected_seq} is missing (the next stored record is {row.seq!r})",
            seq=expected_seq,
        )
    try:
        record = to_record(row)
    except CorruptRecord as exc:
        raise ChainBroken(f"record {row.seq} cannot be read: {exc.message}", seq=row.seq) from exc
    if record.prev_hash != prev_hash:
        raise ChainBroken(f"record {row.seq} does not link to record {row.seq - 1}", seq=row.seq)
    data = _preimage(prev_hash, row.seq, record.timestamp, _event_of(record))
    if hashlib.sha256(data).hexdigest() != record.hash:
        raise ChainBroken(f"record {row.seq}'s hash does not match its contents", seq=row.seq)
    return record, merkle.leaf_hash(data)


# --- verification --------------------------------------------------------------------------------


def verify_rows(
    rows: Iterable[StoredRow],
    *,
    anchor: Anchor | None,
    anchor_state: str | None = None,
    leaves: list[bytes] | None = None,
) -> VerifyReport:
    """Walk ``rows`` (ascending seq) and report the first record that breaks the chain.

    ``leaves``, when given, receives each intact record's Merkle leaf hash on the way (the hash
    check already builds ``leaf_data``: ``verify --checkpoint`` saves a second pass over 100k
    records that way).

    ``anchor`` is the head read *before* the rows (appends commit first, then move the anchor, so
    an honest database is never behind its anchor; it may be ahead while an append is in flight).
    ``anchor_state`` names an anchor problem found while reading it ("missing", "unreadable: ...")
    when the caller expected one.
    """
    count = 0
    expected_seq = 1
    prev_hash = GENESIS_HASH
    hash_at_anchor: str | None = None
    for row in rows:
        count += 1
        seq = row.seq
        if seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                missing = (
                    f"record {expected_seq} is missing"
                    if seq == expected_seq + 1
                    else f"records {expected_seq}..{seq - 1} are missing"
                )
                return _bad(count, expected_seq, f"{missing} (the next stored record is {seq})")
            return _bad(count, expected_seq, f"unexpected seq {seq!r} where {expected_seq} belongs")
        try:
            record = to_record(row)
        except CorruptRecord as exc:
            return _bad(count, seq, exc.message)
        if record.prev_hash != prev_hash:
            return _bad(
                count,
                seq,
                f"prev_hash does not match the hash of record {seq - 1}"
                if seq > 1
                else "prev_hash of the first record is not the genesis hash",
            )
        data = _preimage(prev_hash, seq, record.timestamp, _event_of(record))
        if hashlib.sha256(data).hexdigest() != record.hash:
            return _bad(count, seq, "hash does not match the record's contents (edited or moved)")
        if leaves is not None:
            leaves.append(merkle.leaf_hash(data))
        if anchor is not None and seq == anchor.seq:
            hash_at_anchor = record.hash
        prev_hash = record.hash
        expected_seq += 1
    head = expected_seq - 1

    if anchor_state is not None:
        if anchor_state == "missing" and count == 0:
            return VerifyReport(ok=True, records=0)
        return _bad(
            count,
            None,
            f"anchor file {anchor_state}: deletion of the newest records cannot be ruled out",
        )
    if anchor is not None:
        if anchor.seq > head:
            gone = (
                f"record {head + 1} is"
                if anchor.seq == head + 1
                else f"records {head + 1}..{anchor.seq} are"
            )
            return _bad(
                count,
                head + 1,
                f"{gone} missing: the anchor says the trail ends at seq {anchor.seq}",
            )
        if hash_at_anchor != anchor.hash:
            return _bad(
                count, anchor.seq, "hash does not match the anchor (the head was rewritten)"
            )
    return VerifyReport(ok=True, records=count)


def _bad(count: int, seq: int | None, reason: str) -> VerifyReport:
    return VerifyReport(ok=False, records=count, first_bad_seq=seq, reason=reason)


def parse_anchor(text: str) -> Anchor:
    """Read ``{"seq": N, "hash": "..."}``; ValueError if it is anything else."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("anchor is not a JSON object")
    seq, digest = data.get("seq"), data.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError("anchor seq is not a positive integer")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError("anchor hash is not a sha256 hex digest")
    return Anchor(seq=seq, hash=digest)


def format_anchor(anchor: Anchor) -> str:
    return canonical_json({"seq": anchor.seq, "hash": anchor.hash}) + "\n"


def emit_log(record: AuditRecord) -> None:
    """The one structured log line per appended record (ADR section 10 fields)."""
    logs.log_event(
        _logger,
        "audit_record",
        timestamp=format_timestamp(record.timestamp),
        seq=record.seq,
        event_type=record.event_type,
        deployment_id=record.deployment_id,
        service=record.service,
        region=record.region,
        user=record.user,
        status=record.status,
        duration_ms=record.duration_ms,
        detail=dict(record.detail),
        hash=record.hash,
    )
