"""audit/publishing.py: the checkpoint publisher and its witnesses, on a real SQLite trail."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from shipyard.audit import SqlAuditLog, merkle
from shipyard.audit.checkpoint import CheckpointSigner
from shipyard.audit.log import load_publications, read_rows
from shipyard.audit.proving import leaf_hashes
from shipyard.audit.publishing import (
    CheckpointPublisher,
    FileWitness,
    HttpWitness,
    Witness,
    WitnessFailed,
    parse_witness,
)
from shipyard.domain.clock import FakeClock
from shipyard.errors import InvalidInput
from tests.audit.conftest import Ticker, rewrite_history, sample_event, truncate_history


class ListWitness:
    """Keeps every checkpoint it is given; fails while ``failing`` holds an exception."""

    def __init__(self, target: str = "memory://witness") -> None:
        self.target = target
        self.notes: asyncio.Queue[str] = asyncio.Queue()
        self.failing: Exception | None = None

    async def publish(self, note: str) -> None:
        if self.failing is not None:
            raise self.failing
        self.notes.put_nowait(note)


@pytest.fixture
def audit(engine: Engine, data_dir: Path) -> SqlAuditLog:
    return SqlAuditLog(engine, data_dir / "audit.head", clock=Ticker())


@pytest.fixture
def signer(data_dir: Path) -> CheckpointSigner:
    return CheckpointSigner.load_or_create(data_dir)


def publisher(
    audit: SqlAuditLog, signer: CheckpointSigner, *witnesses: Witness
) -> CheckpointPublisher:
    return CheckpointPublisher(
        engine=audit.engine,
        signer=signer,
        witnesses=list(witnesses),
        clock=FakeClock(),
        interval=60,
    )


async def append(audit: SqlAuditLog, count: int) -> None:
    for n in range(count):
        await audit.append(sample_event(n))


async def test_publishes_the_signed_tree_head_to_a_file_and_records_it(
    audit: SqlAuditLog, signer: CheckpointSigner, data_dir: Path, tmp_path: Path
) -> None:
    await append(audit, 3)
    witness = FileWitness(tmp_path / "checkpoint.txt", history=tmp_path / "history.txt")
    pub = publisher(audit, signer, witness)

    note = await pub.publish()

    assert note is not None and witness.path.read_text() == note
    checkpoint = signer.open(note)
    rows = read_rows(data_dir / "shipyard.db")
    assert checkpoint.size == 3
    assert checkpoint.root == merkle.root_hash(leaf_hashes(rows))
    [published] = load_publications(audit.engine)
    assert (published.witness, published.tree_size) == (str(witness.path), 3)

    await pub.publish()  # nothing new: the witness gets it again, the table no second row
    await append(audit, 2)
    later = await pub.publish()

    assert later is not None and signer.open(later).size == 5
    assert [p.tree_size for p in load_publications(audit.engine)] == [3, 5]
    assert (tmp_path / "history.txt").read_text() == f"{note}\n{later}\n"


async def test_a_failing_witness_is_logged_and_retried_and_never_raises(
    audit: SqlAuditLog, signer: CheckpointSigner, caplog: pytest.LogCaptureFixture
) -> None:
    await append(audit, 2)
    down, up = ListWitness("memory://down"), ListWitness("memory://up")
    down.failing = WitnessFailed("connection refused")
    pub = publisher(audit, signer, down, up)

    with caplog.at_level(logging.ERROR, logger="shipyard.audit.publishing"):
        assert await pub.publish() is not None

    assert up.notes.qsize() == 1 and down.notes.qsize() == 0
    assert [p.witness for p in load_publications(audit.engine)] == ["memory://up"]
    assert any(r.getMessage() == "audit.witness_failed" for r in caplog.records)

    down.failing = RuntimeError("a bug in a witness")
    assert await pub.publish() is not None  # logged with its traceback, still no exception

    down.failing = None
    await pub.publish()
    assert sorted(p.witness for p in load_publications(audit.engine)) == [
        "memory://down",
        "memory://up",
    ]


async def test_refuses_to_sign_once_the_trail_no_longer_extends_what_it_published(
    audit: SqlAuditLog,
    signer: CheckpointSigner,
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await append(audit, 4)
    witness = ListWitness()
    assert await publisher(audit, signer, witness).publish() is not None
    rewrite_history(data_dir / "shipyard.db", data_dir / "audit.head", 2, user="mallory")
    assert audit.verify().ok  # the chain and the anchor were redone: they cannot tell

    restarted = publisher(audit, signer, witness)
    with caplog.at_level(logging.ERROR, logger="shipyard.audit.publishing"):
        assert await restarted.publish() is None

    assert restarted.refusal is not None and "rewritten" in restarted.refusal
    assert witness.notes.qsize() == 1
    assert any(r.getMessage() == "audit.checkpoint_refused" for r in caplog.records)


async def test_refuses_to_sign_a_trail_shorter_than_what_it_published(
    audit: SqlAuditLog, signer: CheckpointSigner, data_dir: Path
) -> None:
    await append(audit, 4)
    witness = ListWitness()
    assert await publisher(audit, signer, witness).publish() is not None
    truncate_history(data_dir / "shipyard.db", data_dir / "audit.head", keep=2)

    restarted = publisher(audit, signer, witness)

    assert await restarted.publish() is None
    assert restarted.refusal is not None and "truncated" in restarted.refusal
    assert witness.notes.qsize() == 1


async def test_run_publishes_on_start_and_when_a_deployment_asks(
    audit: SqlAuditLog, signer: CheckpointSigner
) -> None:
    await append(audit, 1)
    witness = ListWitness()
    pub = publisher(audit, signer, witness)
    task = asyncio.create_task(pub.run())
    try:
        first = await asyncio.wait_for(witness.notes.get(), 10)
        await append(audit, 1)
        pub.request()  # what orchestrator/outcome.py finish does; the fake clock never moves
        second = await asyncio.wait_for(witness.notes.get(), 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert (signer.open(first).size, signer.open(second).size) == (1, 2)


async def test_http_witness_posts_text_plain_and_a_refusal_is_a_failure() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204 if len(seen) == 1 else 503, text="busy")

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    witness = HttpWitness("https://witness.example/add", client)

    await witness.publish("origin\n1\nAAAA\n\n\u2014 origin c2ln\n")
    with pytest.raises(WitnessFailed, match="answered 503"):
        await witness.publish("again")
    await witness.aclose()

    assert seen[0].method == "POST"
    assert seen[0].headers["content-type"] == "text/plain"
    assert seen[0].content.decode().startswith("origin\n1\n")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{data}/witness.txt", "inside the data directory"),
        ("{data}/../data/sub/../witness.txt", "inside the data directory"),
        ("https://user:secret@witness.example/", "holds a credential"),
        ("ftp://witness.example/", "only http"),
        ("{tmp}/no/such/dir/witness.txt", "does not exist"),
        ("{tmp}", "is a directory"),
    ],
    ids=["in-data-dir", "in-data-dir-via-dots", "credential", "ftp", "no-dir", "a-directory"],
)
def test_bad_witnesses_are_refused(
    data_dir: Path, tmp_path: Path, target: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_witness(target.format(data=data_dir, tmp=tmp_path), data_dir)


def test_good_witnesses_are_accepted(data_dir: Path, tmp_path: Path) -> None:
    assert isinstance(parse_witness(str(tmp_path / "w.txt"), data_dir), FileWitness)
    assert isinstance(parse_witness("http://127.0.0.1:9/checkpoint", data_dir), HttpWitness)
