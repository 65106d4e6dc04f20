"""Checking the stored trail against a checkpoint, and proving a record is in it.

What ``shipyard audit verify --checkpoint`` and ``shipyard audit prove`` (cli/audit.py) compute
from the rows they read: the Merkle tree over every record (one leaf per record, seq order, leaf
``chain.leaf_data``), a consistency proof from a checkpoint's tree to today's, an inclusion proof
of one record, and which records no witness has seen yet. Pure: the CLI does the reading.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shipyard.audit import merkle
from shipyard.audit.chain import StoredRow, leaf_data, to_record
from shipyard.audit.checkpoint import Checkpoint
from shipyard.audit.log import Publication


@dataclass(frozen=True)
class ConsistencyReport:
    """Whether today's tree extends ``checkpoint``'s; ``reason`` says how it does not."""

    ok: bool
    checkpoint_size: int
    tree_size: int
    proof_hashes: int = 0
    reason: str | None = None


def leaf_hashes(rows: Sequence[StoredRow]) -> list[bytes]:
    """One leaf hash per stored row, in the order given; CorruptRecord if a row cannot be read."""
    return [merkle.leaf_hash(leaf_data(to_record(row))) for row in rows]


def check_consistency(checkpoint: Checkpoint, leaves: Sequence[bytes]) -> ConsistencyReport:
    """Does the tree over ``leaves`` extend the one ``checkpoint`` signed? Checked the way a
    remote verifier would: an RFC 9162 consistency proof, generated here and verified."""
    m, n = checkpoint.size, len(leaves)
    if m > n:
        return ConsistencyReport(
            ok=False,
            checkpoint_size=m,
            tree_size=n,
            reason=(
                f"the checkpoint covers {m} records but the database holds {n}: records "
                f"{n + 1}..{m} were deleted (the trail was truncated)"
            ),
        )
    if m == 0:  # every tree extends the empty one
        return ConsistencyReport(ok=True, checkpoint_size=0, tree_size=n)
    proof = merkle.consistency_proof(m, leaves)
    if not merkle.verify_consistency(m, n, checkpoint.root, merkle.root_hash(leaves), proof):
        return ConsistencyReport(
            ok=False,
            checkpoint_size=m,
            tree_size=n,
            proof_hashes=len(proof),
            reason=(
                f"records 1..{m} are not the ones the checkpoint signed (its root hash does not "
                "match them): at least one of them was rewritten, removed or re-hashed after it "
                "was published"
            ),
        )
    return ConsistencyReport(ok=True, checkpoint_size=m, tree_size=n, proof_hashes=len(proof))


def inclusion(
    record_seq: int, rows: Sequence[StoredRow], leaves: Sequence[bytes], checkpoint: Checkpoint
) -> dict[str, Any]:
    """The inclusion proof of record ``record_seq`` in ``checkpoint``'s tree, as ``audit prove``
    prints it (hashes base64, like the checkpoint's root). ValueError if it cannot be given."""
    m = checkpoint.size
    if not 1 <= record_seq <= m:
        raise ValueError(f"record {record_seq} is not among the checkpoint's records 1..{m}")
    if m > len(leaves):
        raise ValueError(f"the checkpoint covers {m} records but the database holds {len(leaves)}")
    if merkle.root_hash(leaves[:m]) != checkpoint.root:
        raise ValueError(
            f"the database's records 1..{m} do not match the checkpoint's root hash; run "
            "`shipyard audit verify --checkpoint`"
        )
    index = record_seq - 1
    if rows[index].seq != record_seq:
        raise ValueError(
            f"the stored records are not numbered 1..{len(rows)} without gaps; run "
            "`shipyard audit verify`"
        )
    record = to_record(rows[index])

    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode()

    return {
        "record": record.to_dict(),
        "leaf_index": index,
        "tree_size": m,
        "leaf_data": b64(leaf_data(record)),
        "leaf_hash": b64(leaves[index]),
        "inclusion_path": [b64(h) for h in merkle.inclusion_proof(index, leaves[:m])],
        "root_hash": b64(checkpoint.root),
        "checkpoint": None,  # the caller puts the signed note here
        "hashes": "base64 SHA-256; leaf = SHA-256(0x00 || leaf_data), RFC 9162 section 2.1",
    }


def uncovered(publications: Sequence[Publication], records: int) -> tuple[int, int] | None:
    """The records (first, last) no witness has accepted a checkpoint for; None if none."""
    covered = max((p.tree_size for p in publications), default=0)
    return (covered + 1, records) if covered < records else None
