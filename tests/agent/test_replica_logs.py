"""``agent/replica_logs.py``: stamped lines per stream, rotation with a size cap, reading the tail,
since a time, after a cursor (across rotations), and retention of stopped replicas' logs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from shipyard.agent import replica_logs
from shipyard.agent.replica_logs import LogLimits, ReplicaLog
from shipyard.errors import NotFound
from shipyard.runtime.base import LogBatch, LogQuery

SMALL = LogLimits(segment_bytes=4096, segments=3, keep_revisions=2)


def _log(service_dir: Path, replica_id: str, revision: str = "v1",
         limits: LogLimits = SMALL) -> ReplicaLog:  # fmt: skip
    return ReplicaLog(service_dir / replica_id, limits, service="svc", revision=revision,
                      replica_id=replica_id)  # fmt: skip


def _texts(batch: LogBatch) -> list[str]:
    return [line.text for line in batch.lines]


def test_each_line_keeps_its_stream_a_timestamp_and_its_replica(tmp_path: Path) -> None:
    log = _log(tmp_path, "v1-1-aaaa")
    log.write("stdout", ["starting", ""])
    log.write("stderr", ["Traceback (most recent call last):"])
    batch = replica_logs.read(tmp_path, LogQuery())
    assert [(line.stream, line.text) for line in batch.lines] == [
        ("stdout", "starting"),
        ("stdout", ""),
        ("stderr", "Traceback (most recent call last):"),
    ]
    assert {(line.replica_id, line.revision) for line in batch.lines} == {("v1-1-aaaa", "v1")}
    stamps = [line.timestamp for line in batch.lines]
    assert stamps == sorted(stamps) and stamps[0] > 1_700_000_000
    [segment] = (tmp_path / "v1-1-aaaa").glob("*.log")
    assert stat.S_IMODE(segment.stat().st_mode) == 0o640
    first = segment.read_text().splitlines()[0]
    assert first.endswith("Z stdout starting") and first[:4].isdigit()


def test_rotation_keeps_the_newest_segments_within_the_cap(tmp_path: Path) -> None:
    log = _log(tmp_path, "v1-1-aaaa")
    for i in range(2000):
        log.write("stdout", [f"line {i:05d} " + "x" * 40])
    segments = sorted((tmp_path / "v1-1-aaaa").glob("*.log"))
    assert len(segments) == SMALL.segments
    total = sum(p.stat().st_size for p in segments)
    assert total <= SMALL.segment_bytes * SMALL.segments
    # What is left is the end of the output, without a gap or a torn line.
    everything = replica_logs.read(tmp_path, LogQuery(tail=10_000))
    numbers = [int(t.split()[1]) for t in _texts(everything)]
    assert numbers[-1] == 1999
    assert numbers == list(range(numbers[0], 2000))
    assert numbers[0] > 0  # the oldest lines were rotated away


def test_tail_is_the_last_lines_across_segments(tmp_path: Path) -> None:
    log = _log(tmp_path, "v1-1-aaaa", limits=LogLimits(segment_bytes=8192, segments=3))
    for i in range(300):
        log.write("stdout", [f"n{i}" + "y" * 30])
    assert len(list((tmp_path / "v1-1-aaaa").glob("*.log"))) > 1
    tail = replica_logs.read(tmp_path, LogQuery(tail=150))
    assert [t[: t.index("y")] for t in _texts(tail)] == [f"n{i}" for i in range(150, 300)]
    everything = replica_logs.read(tmp_path, LogQuery(tail=10_000))
    assert len(everything.lines) == 300
    assert replica_logs.read(tmp_path, LogQuery(tail=0)).lines == []


def test_a_cursor_returns_only_what_came_after_even_across_a_rotation(tmp_path: Path) -> None:
    log = _log(tmp_path, "v1-1-aaaa")
    log.write("stdout", ["before"])
    first = replica_logs.read(tmp_path, LogQuery(tail=5))
    assert _texts(first) == ["before"]
    nothing = replica_logs.read(tmp_path, LogQuery(after=first.cursor))
    assert nothing.lines == [] and nothing.cursor == first.cursor
    for i in range(100):  # enough to rotate twice, not to drop a segment
        log.write("stderr", [f"after {i} " + "z" * 40])
    assert len(list((tmp_path / "v1-1-aaaa").glob("*.log"))) > 1
    page = replica_logs.read(tmp_path, LogQuery(after=first.cursor, tail=50))
    assert _texts(page)[0].startswith("after 0 ") and len(page.lines) == 50
    rest = replica_logs.read(tmp_path, LogQuery(after=page.cursor, tail=10_000))
    assert [int(t.split()[1]) for t in _texts(rest)] == list(range(50, 100))
    # A follower so far behind that its position was rotated away resumes at the oldest line kept.
    for i in range(100, 300):
        log.write("stderr", [f"after {i} " + "z" * 40])
    late = replica_logs.read(tmp_path, LogQuery(after=rest.cursor, tail=10_000))
    oldest = replica_logs.read(tmp_path, LogQuery(tail=10_000)).lines[0]
    assert late.lines[0] == oldest and _texts(late)[-1].startswith("after 299 ")


def test_a_line_being_written_is_not_returned_until_it_is_whole(tmp_path: Path) -> None:
    log = _log(tmp_path, "v1-1-aaaa")
    log.write("stdout", ["whole"])
    [segment] = (tmp_path / "v1-1-aaaa").glob("*.log")
    with segment.open("ab") as f:
        f.write(b"2026-01-01T00:00:00.000000Z stdout half")
    batch = replica_logs.read(tmp_path, LogQuery())
    assert _texts(batch) == ["whole"]
    with segment.open("ab") as f:
        f.write(b" done\n")
    assert _texts(replica_logs.read(tmp_path, LogQuery(after=batch.cursor))) == ["half done"]


def test_since_revision_and_replica_filter(tmp_path: Path) -> None:
    a, b = _log(tmp_path, "v1-1-aaaa"), _log(tmp_path, "v2-2-bbbb", "v2")
    a.write("stdout", ["old"])
    cut = replica_logs.read(tmp_path, LogQuery()).lines[-1].timestamp + 1e-6
    while True:  # the next stamp must be later than the cut (microsecond resolution)
        b.write("stdout", ["new"])
        if replica_logs.read(tmp_path, LogQuery(revision="v2")).lines[-1].timestamp >= cut:
            break
    assert set(_texts(replica_logs.read(tmp_path, LogQuery(since=cut)))) == {"new"}
    assert _texts(replica_logs.read(tmp_path, LogQuery(revision="v1"))) == ["old"]
    assert _texts(replica_logs.read(tmp_path, LogQuery(replica_id="v1-1-aaaa"))) == ["old"]
    with pytest.raises(NotFound, match="revision v3"):
        replica_logs.read(tmp_path, LogQuery(revision="v3"))
    with pytest.raises(NotFound, match="replica nope"):
        replica_logs.read(tmp_path, LogQuery(replica_id="nope"))


def test_retention_keeps_the_newest_revisions_and_live_replicas(tmp_path: Path) -> None:
    logs = {}
    for i, rev in enumerate(["v1", "v2", "v3", "v4"]):
        rid = f"{rev}-{i}-abcd"
        logs[rev] = _log(tmp_path, rid, rev)
        meta = tmp_path / rid / replica_logs.META
        doc = json.loads(meta.read_text())
        meta.write_text(json.dumps({**doc, "created": 1000.0 + i}))  # started in this order
    removed = replica_logs.prune(tmp_path, SMALL, live={"v1-0-abcd"})
    assert removed == ["v2-1-abcd"]
    assert sorted(os.listdir(tmp_path)) == ["v1-0-abcd", "v3-2-abcd", "v4-3-abcd"]


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 4096"):
        LogLimits(segment_bytes=10)
    with pytest.raises(ValueError, match="at least one log segment"):
        LogLimits(segments=0)


def test_a_batch_holds_at_most_its_byte_budget_and_the_cursor_covers_only_that(
    tmp_path: Path,
) -> None:
    log = _log(tmp_path, "v1-1-aaaa", limits=LogLimits(segment_bytes=64 * 1024 * 1024))
    first = replica_logs.read(tmp_path, LogQuery(tail=0))
    big = "b" * 60_000
    for i in range(150):  # ~9 MB: more than one batch may carry
        log.write("stdout", [f"{i:03d}{big}"])
    tail = replica_logs.read(tmp_path, LogQuery(tail=10_000))
    assert 0 < len(tail.lines) < 150
    assert tail.lines[-1].text.startswith("149")  # the newest are the ones kept
    assert sum(len(x.text) for x in tail.lines) <= replica_logs.MAX_BATCH_BYTES
    numbers: list[int] = []
    cursor = first.cursor
    while len(numbers) < 150:
        page = replica_logs.read(tmp_path, LogQuery(after=cursor, tail=10_000))
        assert page.lines, "a follower must make progress"
        assert sum(len(x.text) for x in page.lines) <= replica_logs.MAX_BATCH_BYTES
        numbers += [int(x.text[:3]) for x in page.lines]
        cursor = page.cursor
    assert numbers == list(range(150))
