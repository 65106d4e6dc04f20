"""``shipyard audit verify --checkpoint`` and ``audit prove``: what a host attacker who rewrites
the database *and* the anchor cannot hide, and proofs an independent verifier accepts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from tests.audit.conftest import rewrite_history, truncate_history
from typer.testing import CliRunner

from shipyard.audit import AuditEvent, SqlAuditLog
from shipyard.audit.checkpoint import CheckpointSigner
from shipyard.audit.publishing import CheckpointPublisher, FileWitness
from shipyard.cli.audit import audit_app
from shipyard.domain.clock import FakeClock
from shipyard.store.engine import open_engine

runner = CliRunner()


def append(data_dir: Path, count: int) -> None:
    engine = open_engine(None, data_dir)
    try:
        log = SqlAuditLog(engine, data_dir / "audit.head")

        async def go() -> None:
            for n in range(count):
                await log.append(
                    AuditEvent(f"stage.{n}", deployment_id="d-1", user="alice", status="ok")
                )

        asyncio.run(go())
    finally:
        engine.dispose()


def publish(data_dir: Path, witness: Path) -> str:
    """One pass of the publisher ``shipyard serve --witness FILE`` runs."""
    engine = open_engine(None, data_dir)
    try:
        publisher = CheckpointPublisher(
            engine=SqlAuditLog(engine, data_dir / "audit.head").engine,
            signer=CheckpointSigner.load_or_create(data_dir),
            witnesses=[FileWitness(witness)],
            clock=FakeClock(),
        )
        note = asyncio.run(publisher.publish())
    finally:
        engine.dispose()
    assert note is not None
    return note


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    append(d, 4)
    return d


@pytest.fixture
def witness(tmp_path: Path) -> Path:
    other_storage = tmp_path / "witness"
    other_storage.mkdir()
    return other_storage / "checkpoint"


def verify(data_dir: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(audit_app, ["verify", "--data-dir", str(data_dir), *args])
    return result.exit_code, result.stdout + result.stderr


def test_a_rewrite_of_database_and_anchor_passes_verify_but_not_the_checkpoint(
    data_dir: Path, witness: Path
) -> None:
    publish(data_dir, witness)
    rewrite_history(data_dir / "shipyard.db", data_dir / "audit.head", 2, user="mallory")

    plain = verify(data_dir)
    checked = verify(data_dir, "--checkpoint", str(witness))

    assert plain[0] == 0 and "audit trail intact: 4 records" in plain[1]
    assert checked[0] == 1, checked[1]
    assert "audit trail does NOT match the checkpoint" in checked[1]
    assert "records 1..4 are not the ones the checkpoint signed" in checked[1]


def test_truncating_below_the_checkpoint_is_caught(data_dir: Path, witness: Path) -> None:
    publish(data_dir, witness)
    truncate_history(data_dir / "shipyard.db", data_dir / "audit.head", keep=2)

    plain = verify(data_dir)
    checked = verify(data_dir, "--checkpoint", str(witness))

    assert plain[0] == 0, plain[1]
    assert checked[0] == 1
    assert "records 3..4 were deleted (the trail was truncated)" in checked[1]


def test_an_honest_trail_extends_its_checkpoint_and_says_what_is_newer(
    data_dir: Path, witness: Path
) -> None:
    publish(data_dir, witness)
    append(data_dir, 2)

    code, out = verify(data_dir, "--checkpoint", str(witness))
    plain_code, plain = verify(data_dir)

    assert code == 0, out
    assert "audit trail intact: 6 records" in out
    assert "at tree size 4 (signature verified; consistency proof of" in out
    assert "records 5..6 are newer than this checkpoint" in out
    assert plain_code == 0
    assert "no checkpoint was published to a witness for records 5..6" in plain


def test_verify_with_only_the_verifier_key_and_from_a_url(
    data_dir: Path, witness: Path, tmp_path: Path
) -> None:
    note = publish(data_dir, witness)
    vkey = tmp_path / "log.vkey"  # what a verifier elsewhere keeps
    vkey.write_text((data_dir / "keys" / "checkpoint.vkey").read_text())

    with serve_text(note) as url:
        code, out = verify(data_dir, "--checkpoint", url, "--checkpoint-key", str(vkey))

    assert code == 0, out
    assert "consistent with checkpoint shipyard.local/" in out


def test_a_checkpoint_signed_by_another_key_is_rejected(data_dir: Path, witness: Path) -> None:
    publish(data_dir, witness)
    forger = CheckpointSigner(Ed25519PrivateKey.generate())
    witness.write_text(forger.sign(4, b"\0" * 32))

    code, out = verify(data_dir, "--checkpoint", str(witness))

    assert code == 1
    assert "REJECTED: the checkpoint is not signed by the key shipyard.local/" in out


def test_a_missing_checkpoint_or_key_exits_2(data_dir: Path, witness: Path) -> None:
    assert verify(data_dir, "--checkpoint", str(witness))[0] == 2
    publish(data_dir, witness)
    code, out = verify(data_dir, "--checkpoint", str(witness), "--checkpoint-key", "/nope")
    assert code == 2 and "cannot read checkpoint key /nope" in out


# --- prove, checked by a verifier that shares no code with Shipyard ------------------------------


def independent_inclusion_check(
    index: int, size: int, leaf: bytes, path: list[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2, step by step."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn // 2, sn // 2
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn // 2, sn // 2
    return sn == 0 and r == root


def independent_note_check(note: str, vkey: str) -> list[str]:
    """c2sp.org/signed-note with an Ed25519 vkey; returns the note's text lines."""
    name, key_id_hex, key_b64 = vkey.strip().split("+", 2)
    material = base64.b64decode(key_b64)
    assert material[0] == 1
    public = Ed25519PublicKey.from_public_bytes(material[1:])
    assert hashlib.sha256(name.encode() + b"\n" + material).digest()[:4].hex() == key_id_hex
    text, signatures = note.rsplit("\n\n", 1)
    text += "\n"
    for line in signatures.splitlines():
        dash, signer, sig = line.split(" ")
        blob = base64.b64decode(sig)
        if dash == "\u2014" and signer == name and blob[:4].hex() == key_id_hex:
            public.verify(blob[4:], text.encode())  # raises InvalidSignature if forged
            return text.splitlines()
    raise AssertionError("no signature by the log's key")


def test_prove_prints_a_proof_an_independent_verifier_accepts(
    data_dir: Path, witness: Path
) -> None:
    publish(data_dir, witness)
    append(data_dir, 3)  # newer records are not in the witnessed tree: the proof is against it
    vkey = (data_dir / "keys" / "checkpoint.vkey").read_text()

    for seq in (1, 3, 4):
        result = runner.invoke(audit_app, ["prove", str(seq), "--data-dir", str(data_dir)])
        assert result.exit_code == 0, result.output
        proof = json.loads(result.stdout)

        origin, size, root_b64 = independent_note_check(proof["checkpoint"], vkey)
        leaf_data = base64.b64decode(proof["leaf_data"])
        leaf = hashlib.sha256(b"\x00" + leaf_data).digest()
        assert base64.b64encode(leaf).decode() == proof["leaf_hash"]
        # the leaf is the record: its chain hash is SHA-256 of the same bytes
        assert hashlib.sha256(leaf_data).hexdigest() == proof["record"]["hash"]
        assert (proof["leaf_index"], proof["tree_size"], int(size)) == (seq - 1, 4, 4)
        assert root_b64 == proof["root_hash"]
        path = [base64.b64decode(h) for h in proof["inclusion_path"]]
        root = base64.b64decode(root_b64)
        assert independent_inclusion_check(seq - 1, 4, leaf, path, root)
        assert not independent_inclusion_check(seq % 4, 4, leaf, path, root)
        assert origin.startswith("shipyard.local/")


def test_prove_against_a_given_checkpoint_and_refuses_what_it_does_not_cover(
    data_dir: Path, witness: Path
) -> None:
    publish(data_dir, witness)
    append(data_dir, 1)

    given = runner.invoke(
        audit_app, ["prove", "2", "--data-dir", str(data_dir), "--checkpoint", str(witness)]
    )
    uncovered = runner.invoke(audit_app, ["prove", "5", "--data-dir", str(data_dir)])

    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout)["checkpoint"] == witness.read_text()
    assert uncovered.exit_code == 1
    assert "record 5 is not covered by a checkpoint a witness accepted" in uncovered.stderr


def test_prove_refuses_a_trail_rewritten_since_the_checkpoint(
    data_dir: Path, witness: Path
) -> None:
    publish(data_dir, witness)
    rewrite_history(data_dir / "shipyard.db", data_dir / "audit.head", 1, status="forged")

    result = runner.invoke(
        audit_app, ["prove", "3", "--data-dir", str(data_dir), "--checkpoint", str(witness)]
    )

    assert result.exit_code == 1
    assert "do not match the checkpoint's root hash" in result.stderr


@contextlib.contextmanager
def serve_text(text: str) -> Iterator[str]:
    """A witness's HTTP endpoint that serves ``text`` (a real server on a free port)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/checkpoint"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
