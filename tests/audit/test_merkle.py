"""audit/merkle.py against RFC 6962/9162: published vectors, an independent recursive reference,
and properties (every proof verifies, every tampered proof fails)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.audit import merkle

#: transparency-dev/merkle's testdata/{inclusion,consistency} in one file (its "source" says which
#: commit); each case names its original file.
VECTORS = json.loads(
    (Path(__file__).parent / "testdata" / "transparency_dev_merkle.json").read_text()
)

#: The leaves of RFC 6962's (and every CT implementation's) reference tree, and the heads of its
#: first 1..8 leaves (transparency-dev/merkle cmd/proofgen, Google's certificate-transparency).
RFC6962_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def b64(values: list[str] | None) -> list[bytes]:
    return [base64.b64decode(v) for v in values or []]


# --- an independent reference: RFC 9162 section 2.1 written as literally as possible -----------


def ref_mth(data: list[bytes]) -> bytes:
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(data[:k]) + ref_mth(data[k:])).digest()


def ref_path(m: int, data: list[bytes]) -> list[bytes]:
    n = len(data)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, data[:k]), ref_mth(data[k:])]
    return [*ref_path(m - k, data[k:]), ref_mth(data[:k])]


def ref_subproof(m: int, data: list[bytes], whole: bool) -> list[bytes]:
    n = len(data)
    if m == n:
        return [] if whole else [ref_mth(data)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, data[:k], whole), ref_mth(data[k:])]
    return [*ref_subproof(m - k, data[k:], False), ref_mth(data[:k])]


def leaf_hashes(data: list[bytes]) -> list[bytes]:
    return [merkle.leaf_hash(d) for d in data]


# --- published vectors ---------------------------------------------------------------------------


def test_hashes_match_rfc6962_hasher_vectors() -> None:
    assert merkle.EMPTY_ROOT.hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert merkle.leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert merkle.leaf_hash(b"L123456").hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert merkle.node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


@pytest.mark.parametrize("size", range(1, 9))
def test_tree_heads_of_the_reference_tree(size: int) -> None:
    hashes = leaf_hashes(RFC6962_LEAVES[:size])
    frontier = merkle.Frontier()
    for h in hashes:
        frontier.append(h)

    assert merkle.root_hash(hashes).hex() == RFC6962_ROOTS[size - 1]
    assert frontier.root().hex() == RFC6962_ROOTS[size - 1]


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: c["file"])
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    ok = merkle.verify_inclusion(
        case["leafIdx"],
        case["treeSize"],
        base64.b64decode(case["leafHash"] or ""),
        b64(case["proof"]),
        base64.b64decode(case["root"] or ""),
    )
    assert ok is not case["wantErr"]


@pytest.mark.parametrize("case", VECTORS["consistency"], ids=lambda c: c["file"])
def test_consistency_vectors(case: dict[str, Any]) -> None:
    ok = merkle.verify_consistency(
        case["size1"],
        case["size2"],
        base64.b64decode(case["root1"] or ""),
        base64.b64decode(case["root2"] or ""),
        b64(case["proof"]),
    )
    assert ok is not case["wantErr"]


def test_generated_proofs_equal_the_published_happy_paths() -> None:
    hashes = leaf_hashes(RFC6962_LEAVES)
    checked = 0
    for case in VECTORS["inclusion"]:
        if case["desc"] == "happy path" and case["treeSize"] <= len(hashes):
            proof = merkle.inclusion_proof(case["leafIdx"], hashes[: case["treeSize"]])
            assert proof == b64(case["proof"]), case["file"]
            checked += 1
    for case in VECTORS["consistency"]:
        if case["desc"] == "happy path" and 0 < case["size1"] < case["size2"] <= len(hashes):
            proof = merkle.consistency_proof(case["size1"], hashes[: case["size2"]])
            assert proof == b64(case["proof"]), case["file"]
            checked += 1
    assert checked >= 8


# --- against the reference, every size -----------------------------------------------------------

leaves_strategy = st.lists(st.binary(max_size=8), min_size=1, max_size=70)
#: Tampering tests need distinct leaves: with equal subtrees a proof for one position is honestly
#: also a proof for its twin.
distinct_leaves = st.lists(st.binary(max_size=8), min_size=1, max_size=70, unique=True)


@settings(max_examples=150)
@given(data=leaves_strategy)
def test_heads_and_proofs_equal_the_recursive_reference(data: list[bytes]) -> None:
    hashes = leaf_hashes(data)
    frontier = merkle.Frontier()
    for h in hashes:
        frontier.append(h)

    assert merkle.root_hash(hashes) == ref_mth(data) == frontier.root()
    for m in range(len(data)):
        assert merkle.inclusion_proof(m, hashes) == ref_path(m, data)
    for m in range(1, len(data)):
        assert merkle.consistency_proof(m, hashes) == ref_subproof(m, data, True)


@settings(max_examples=150)
@given(data=distinct_leaves, pick=st.integers(min_value=0))
def test_every_inclusion_proof_verifies_and_a_tampered_one_fails(
    data: list[bytes], pick: int
) -> None:
    hashes = leaf_hashes(data)
    n, root = len(hashes), merkle.root_hash(hashes)
    for m in range(n):
        proof = merkle.inclusion_proof(m, hashes)
        assert merkle.verify_inclusion(m, n, hashes[m], proof, root)
        # another leaf, another index, another size, another root: all refused
        assert not merkle.verify_inclusion(m, n, merkle.leaf_hash(b"forged"), proof, root)
        assert not merkle.verify_inclusion(m, n, hashes[m], proof, merkle.leaf_hash(b"forged"))
        if n > 1:
            other = (m + 1 + pick % (n - 1)) % n
            assert not merkle.verify_inclusion(other, n, hashes[m], proof, root)
        if proof:
            i = pick % len(proof)
            flipped = bytes([proof[i][0] ^ 1]) + proof[i][1:]
            assert not merkle.verify_inclusion(
                m, n, hashes[m], [*proof[:i], flipped, *proof[i + 1 :]], root
            )
            assert not merkle.verify_inclusion(m, n, hashes[m], proof[:-1], root)
            assert not merkle.verify_inclusion(m, n, hashes[m], [*proof, proof[0]], root)


@settings(max_examples=150)
@given(data=distinct_leaves, pick=st.integers(min_value=0))
def test_every_consistency_proof_verifies_and_a_tampered_one_fails(
    data: list[bytes], pick: int
) -> None:
    hashes = leaf_hashes(data)
    n, root = len(hashes), merkle.root_hash(hashes)
    for m in range(1, n + 1):
        old = merkle.root_hash(hashes[:m])
        proof = merkle.consistency_proof(m, hashes)
        assert merkle.verify_consistency(m, n, old, root, proof)
        rewritten = merkle.root_hash([merkle.leaf_hash(b"forged"), *hashes[1:m]])
        assert not merkle.verify_consistency(m, n, rewritten, root, proof)
        assert not merkle.verify_consistency(m, n, old, merkle.leaf_hash(b"forged"), proof)
        if proof:
            i = pick % len(proof)
            flipped = bytes([proof[i][0] ^ 1]) + proof[i][1:]
            assert not merkle.verify_consistency(
                m, n, old, root, [*proof[:i], flipped, *proof[i + 1 :]]
            )
            assert not merkle.verify_consistency(m, n, old, root, proof[:-1])
        if m < n:  # a truncated tree is not an extension of the longer one
            assert not merkle.verify_consistency(n, m, root, old, proof)


def test_bad_indices_are_value_errors() -> None:
    hashes = leaf_hashes(RFC6962_LEAVES[:3])
    with pytest.raises(ValueError, match="outside a tree of 3 leaves"):
        merkle.inclusion_proof(3, hashes)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        merkle.consistency_proof(4, hashes)
    assert merkle.consistency_proof(0, hashes) == merkle.consistency_proof(3, hashes) == []
