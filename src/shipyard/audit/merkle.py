"""The RFC 9162 Merkle tree over the audit records: tree heads, inclusion and consistency proofs.

Pure functions on 32-byte SHA-256 hashes, no I/O. Used by the checkpoint publisher
(``publishing.py``: ``Frontier`` keeps the tree head up to date in O(log n) per record) and by
``shipyard audit verify --checkpoint`` / ``audit prove`` (cli/audit.py: proofs over every leaf).

- leaf hash ``SHA-256(0x00 || leaf)``, interior node ``SHA-256(0x01 || left || right)``, the tree
  head ``MTH`` of any number of leaves as RFC 9162 section 2.1.1 defines it (the empty tree's head
  is ``SHA-256()``);
- ``inclusion_proof`` / ``verify_inclusion``: sections 2.1.3.1 and 2.1.3.2;
- ``consistency_proof`` / ``verify_consistency``: sections 2.1.4.1 and 2.1.4.2.

What a leaf *is* for Shipyard is chain.py's ``leaf_data``: the exact bytes whose SHA-256 is the
record's chain hash. The verifiers follow the RFC's algorithms step by step, so a proof made here
is accepted by any RFC 6962/9162 implementation (tests/audit/test_merkle.py checks that against
transparency-dev/merkle's test vectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaf hashes ``leaves`` (RFC 9162 section 2.1.1), in O(n) and without recursion.

    Pairing neighbours level by level and lifting an odd last node unchanged builds the same
    left-balanced tree as the RFC's split at the largest power of two below n.
    """
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 9162 section 2.1.3.1: the audit path of leaf ``index``.

    ValueError if ``index`` is not a leaf of the tree.
    """
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:  # descend; the sibling of each step is pushed, nearest the leaf last
        k = _split(hi - lo)
        if index - lo < k:
            path.append(root_hash(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root_hash(leaves[lo : lo + k]))
            lo += k
    path.reverse()
    return path


def consistency_proof(first: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(first, D[n]) of RFC 9162 section 2.1.4.1, from the tree of the first ``first``
    leaves to the tree of all of them. Empty when ``first`` is 0 or n (nothing to prove).

    ValueError if ``first`` is negative or larger than the tree.
    """
    n = len(leaves)
    if not 0 <= first <= n:
        raise ValueError(f"tree size {first} is outside 0..{n}")
    if first in (0, n):
        return []
    proof: list[bytes] = []
    lo, hi, m, whole = 0, n, first, True  # SUBPROOF(m, D[lo:hi], whole)
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(root_hash(leaves[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(root_hash(leaves[lo : lo + k]))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        proof.append(root_hash(leaves[lo:hi]))
    proof.reverse()
    return proof


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` in the tree
    of ``size`` leaves whose head is ``root``?"""
    if not 0 <= index < size or not _hashes(leaf, root, *proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree of ``second`` leaves with head ``second_root`` an
    append-only extension of the one of ``first`` leaves with head ``first_root``?

    The RFC's algorithm covers 0 < first < second. Equal sizes need equal heads and an empty
    proof. From the empty tree there is no proof at all (every tree extends it; transparency-dev
    /merkle rejects such a "proof" too): callers treat a size-0 checkpoint as trivially kept.
    """
    if not 0 <= first <= second or not _hashes(*proof):
        return False
    if first == 0:
        return False
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # an exact power of two: the old head is a node of the new tree
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


def _hashes(*values: bytes) -> bool:
    return all(len(v) == HASH_SIZE for v in values)


class Frontier:
    """The tree head kept up to date one leaf at a time: the roots of the perfect subtrees that
    make up the tree (one per set bit of its size, largest first), so an append costs O(log n)
    hashes amortised and ``root`` O(log n), and memory is O(log n) for any number of records.
    """

    def __init__(self) -> None:
        self.size = 0
        #: (height, hash) of each perfect subtree, left to right; heights strictly decrease.
        self._peaks: list[tuple[int, bytes]] = []

    def append(self, leaf: bytes) -> None:
        """Add the leaf hash ``leaf`` as the next leaf."""
        height, node = 0, leaf
        while self._peaks and self._peaks[-1][0] == height:
            _, left = self._peaks.pop()
            height, node = height + 1, node_hash(left, node)
        self._peaks.append((height, node))
        self.size += 1

    def root(self) -> bytes:
        """MTH of the leaves so far: the peaks folded right to left (RFC 9162's split at the
        largest power of two is exactly the leftmost peak)."""
        if not self._peaks:
            return EMPTY_ROOT
        node = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            node = node_hash(left, node)
        return node
