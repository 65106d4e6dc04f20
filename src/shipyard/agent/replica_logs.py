"""Replica logs on the agent's disk: written by the supervisor's pump thread, read by the agent's
API (``POST /v1/services/{s}/logs``), pruned when a replica of the service starts.

Layout, under ``<agent_dir>/logs/<service>/<replica_id>/``::

    replica.json                  {"service", "revision", "replica_id", "created"}
    00000000000000000000.log      segments, each named by the byte position of its first line
    00000000000010485761.log      in the replica's whole output (its "base")

A line is ``<UTC ISO time> <stdout|stderr> <text>\\n``: readable with ``tail -f``, parsed back by
``read``. A position is a byte offset in the replica's whole output, which never moves: rotation
starts a new segment at ``base + size`` of the last one instead of renaming files (renames would
shift offsets under a reader following the log), and drops the oldest segment beyond
``LogLimits.segments``. So a follower's cursor stays valid across rotations, and one whose
position was rotated away resumes at the oldest segment left.

Size cap: ``segment_bytes * segments`` per replica (10 MiB x 3 by default; a segment passes its
size by at most one write, i.e. one 64 KiB read of the replica's output). Retention: the logs of
the replicas of a service's ``keep_revisions`` most recent revisions (by their newest replica's
start) are kept, stopped or not, and every live replica's; older ones are deleted when a replica
of the service starts. A restarted replica keeps its id and appends to the same log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import NotFound
from shipyard.private_files import open_log
from shipyard.runtime.base import MAX_LOG_LINES, LogBatch, LogLine, LogQuery, LogStream

META = "replica.json"
#: At most this much text in one batch (10,000 lines of up to 64 KiB would be 640 MiB); a
#: follower gets the rest with its next read.
MAX_BATCH_BYTES = 4 * 1024 * 1024
_SUFFIX = ".log"
_BLOCK = 64 * 1024


@dataclass(frozen=True)
class LogLimits:
    """How much of each replica's output the agent keeps (``shipyard agent --replica-log-*``)."""

    #: A segment is closed and a new one begun once the next write would pass this size.
    segment_bytes: int = 10 * 1024 * 1024
    #: Segments kept per replica, the one being written included.
    segments: int = 3
    #: Revisions per service whose replicas' logs are kept after they stop.
    keep_revisions: int = 5

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ValueError(
                f"a replica log segment must hold at least 4096 bytes, got {self.segment_bytes}"
            )
        if self.segments < 1:
            raise ValueError(f"a replica keeps at least one log segment, got {self.segments}")
        if self.keep_revisions < 1:
            raise ValueError(f"logs of at least one revision are kept, got {self.keep_revisions}")


def format_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _segments(directory: Path) -> list[tuple[int, Path]]:
    """``(base, path)`` of a replica's segments, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            stem = entry.name.removesuffix(_SUFFIX)
            if entry.name.endswith(_SUFFIX) and stem.isdigit():
                found.append((int(stem), entry))
    return sorted(found)


def _segment_path(directory: Path, base: int) -> Path:
    return directory / f"{base:020d}{_SUFFIX}"


class ReplicaLog:
    """One replica's log, written by the supervisor's pump threads (one per process start; an
    earlier start's may still be draining what orphaned workers print), so every write holds a
    lock. Created by ``Supervisor.start_replica``."""

    def __init__(self, directory: Path, limits: LogLimits, *, service: str, revision: str,
                 replica_id: str) -> None:  # fmt: skip
        self.directory = directory
        self.limits = limits
        self.replica_id = replica_id
        self.revision = revision
        self._lock = threading.Lock()
        #: Pump threads writing to it; the file is closed once none is and ``retire`` was called.
        self._writers = 0
        self._retired = False
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"service": service, "revision": revision, "replica_id": replica_id,
                "created": time.time()}  # fmt: skip
        fd = open_log(directory / META)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(meta).encode())
        finally:
            os.close(fd)
        existing = _segments(directory)
        self._base = existing[-1][0] if existing else 0
        self._fd = open_log(_segment_path(directory, self._base))
        self._size = os.fstat(self._fd).st_size

    def write(self, stream: LogStream, texts: Sequence[str], *, at: float | None = None) -> None:
        """Append one line per text (no newline in them), stamped ``at`` (the time the Docker
        Engine stamped a container's line) or now, rotating first if the segment would pass
        its size."""
        if not texts:
            return
        with self._lock:
            stamp = f"{format_time(time.time() if at is None else at)} {stream} "
            data = "".join(f"{stamp}{t}\n" for t in texts).encode("utf-8", errors="replace")
            if self._fd < 0:
                return
            if self._size and self._size + len(data) > self.limits.segment_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._size += len(data)

    def last_time(self) -> float | None:
        """The stamp of the last line stored (None: none yet); where an adopted container's
        output is followed again from (``agent.containers``)."""
        for _, path in reversed(_segments(self.directory)):
            try:
                with path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - _BLOCK))
                    tail = f.read()
            except OSError:
                continue
            for raw in reversed(tail.splitlines()):
                parsed = parse_line(raw)
                if parsed is not None:
                    return parsed[0]
        return None

    def _rotate(self) -> None:
        os.close(self._fd)
        self._base += self._size
        self._fd = open_log(_segment_path(self.directory, self._base))
        self._size = 0
        for _, path in _segments(self.directory)[: -self.limits.segments]:
            path.unlink(missing_ok=True)

    def attach(self) -> None:
        """A pump thread begins writing (it ``detach``es when its pipes are closed)."""
        with self._lock:
            self._writers += 1

    def detach(self) -> None:
        with self._lock:
            self._writers -= 1
            self._close_if_done()

    def retire(self) -> None:
        """The replica is stopped for good: close the file once the last pump has written what
        the replica's processes printed before they died."""
        with self._lock:
            self._retired = True
            self._close_if_done()

    def _close_if_done(self) -> None:
        if self._retired and self._writers <= 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Replica:
    replica_id: str
    revision: str
    created: float
    directory: Path


def _replicas(service_dir: Path) -> list[_Replica]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in service_dir.iterdir():
            try:
                meta = json.loads((entry / META).read_text())
                found.append(_Replica(str(meta["replica_id"]), str(meta["revision"]),
                                      float(meta["created"]), entry))  # fmt: skip
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a replica's directory, or one being created
    return found


def parse_line(raw: bytes) -> tuple[float, LogStream, str] | None:
    """``(timestamp, stream, text)`` of one stored line (without its newline), None if it is
    not one (a file edited by hand)."""
    parts = raw.decode("utf-8", errors="replace").split(" ", 2)
    if len(parts) < 2 or parts[1] not in ("stdout", "stderr"):
        return None
    try:
        ts = dt.datetime.fromisoformat(parts[0]).timestamp()
    except ValueError:
        return None
    stream: LogStream = "stdout" if parts[1] == "stdout" else "stderr"
    return ts, stream, parts[2] if len(parts) > 2 else ""


#: A parsed line with the position just after it, for the cursor.
_Entry = tuple[LogLine, int]


def _forward(replica: _Replica, position: int, limit: int) -> tuple[list[_Entry], int]:
    """Up to ``limit`` complete lines from ``position`` on, and where reading stopped (after
    the last complete line read: an unfinished one is read again next time)."""
    entries: list[_Entry] = []
    segments = _segments(replica.directory)
    if limit <= 0 or not segments:
        return entries, position
    position = max(position, segments[0][0])  # rotated away: resume at the oldest kept
    for i, (base, path) in enumerate(segments):
        next_base = segments[i + 1][0] if i + 1 < len(segments) else None
        if next_base is not None and position >= next_base:
            continue
        try:
            with path.open("rb") as f:
                f.seek(position - base)
                data = f.read()
        except FileNotFoundError:
            continue  # rotated away while we read
        for raw in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
            position += len(raw) + 1
            parsed = parse_line(raw)
            if parsed is not None:
                entries.append((_line(replica, parsed), position))
                if len(entries) >= limit:
                    return entries, position
        if next_base is not None:
            position = next_base  # a rotated segment ends with a whole line
    return entries, position


def _line(replica: _Replica, parsed: tuple[float, LogStream, str]) -> LogLine:
    ts, stream, text = parsed
    return LogLine(ts, replica.replica_id, replica.revision, stream, text)


def _backward(replica: _Replica, count: int, since: float | None) -> tuple[list[_Entry], int]:
    """The last ``count`` complete lines at or after ``since``, oldest first, and the position
    after the last complete line (where following continues)."""
    found: list[_Entry] = []
    segments = _segments(replica.directory)
    end: int | None = None
    for base, path in reversed(segments):
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                data, pos = b"", size
                while pos > 0 and data.count(b"\n") <= count - len(found):
                    step = min(_BLOCK, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except FileNotFoundError:
            continue
        cut = data.rfind(b"\n") + 1
        if end is None:
            end = base + pos + cut
        lines = data[:cut].split(b"\n")[:-1]
        # The first line is partial unless the read reached the segment's start.
        first = 0 if pos == 0 else 1
        offset = base + pos + cut
        batch: list[_Entry] = []
        for raw in reversed(lines[first:]):
            parsed = parse_line(raw)
            position = offset
            offset -= len(raw) + 1
            if parsed is None:
                continue
            if since is not None and parsed[0] < since:
                return list(reversed(found + batch)), end
            batch.append((_line(replica, parsed), position))
            if len(found) + len(batch) >= count:
                return list(reversed(found + batch)), end
        found += batch
    return list(reversed(found)), end if end is not None else 0


def read(service_dir: Path, query: LogQuery) -> LogBatch:
    """``Runtime.read_logs`` for the files under ``service_dir`` (blocking: the agent calls it
    in a worker thread). NotFound when no replica matches."""
    replicas = [
        r
        for r in _replicas(service_dir)
        if (query.revision is None or r.revision == query.revision)
        and (query.replica_id is None or r.replica_id == query.replica_id)
    ]
    if not replicas:
        raise NotFound(_nothing(service_dir.name, query))
    limit = max(0, min(query.tail, MAX_LOG_LINES))
    entries: list[_Entry] = []
    cursor: dict[str, int] = {}
    for r in replicas:
        if query.after is not None:
            got, end = _forward(r, query.after.get(r.replica_id, 0), limit)
            if query.since is not None:
                got = [e for e in got if e[0].timestamp >= query.since]
        else:
            got, end = _backward(r, limit, query.since) if limit else ([], 0)
            if not limit:
                _, end = _backward(r, 1, None)
        entries += got
        cursor[r.replica_id] = end
    entries.sort(key=lambda e: (e[0].timestamp, e[0].replica_id, e[1]))
    if query.after is not None:
        taken = _within_budget(entries[:limit])
        # Only as far as what is returned: the rest comes with the next read.
        for r in replicas:
            mine = [pos for line, pos in entries if line.replica_id == r.replica_id]
            kept = [pos for line, pos in taken if line.replica_id == r.replica_id]
            if len(kept) < len(mine):
                cursor[r.replica_id] = kept[-1] if kept else query.after.get(r.replica_id, 0)
    else:
        newest = entries[max(0, len(entries) - limit) :] if limit else []
        taken = list(reversed(_within_budget(list(reversed(newest)))))
    return LogBatch(lines=[line for line, _ in taken], cursor=cursor)


def _within_budget(entries: list[_Entry]) -> list[_Entry]:
    """The first of ``entries`` whose text fits in ``MAX_BATCH_BYTES`` (at least one)."""
    total = 0
    for i, (line, _) in enumerate(entries):
        total += len(line.text) + 100  # the fields around the text, roughly
        if total > MAX_BATCH_BYTES and i > 0:
            return entries[:i]
    return entries


def _nothing(service: str, query: LogQuery) -> str:
    if query.replica_id is not None:
        return f"no logs of replica {query.replica_id} of {service} on this agent"
    if query.revision is not None:
        return f"no logs of revision {query.revision} of {service} on this agent"
    return f"no logs of service {service} on this agent"


def prune(service_dir: Path, limits: LogLimits, live: Collection[str]) -> list[str]:
    """Delete the logs of replicas beyond the newest ``keep_revisions`` revisions, sparing the
    ``live`` replica ids; returns the replica ids removed. Called when a replica starts."""
    replicas = _replicas(service_dir)
    newest: dict[str, float] = {}
    for r in replicas:
        newest[r.revision] = max(newest.get(r.revision, 0.0), r.created)
    kept = set(sorted(newest, key=lambda rev: newest[rev], reverse=True)[: limits.keep_revisions])
    removed = []
    for r in replicas:
        if r.revision not in kept and r.replica_id not in live:
            shutil.rmtree(r.directory, ignore_errors=True)
            removed.append(r.replica_id)
    return removed


def text_of(lines: Iterable[LogLine]) -> list[str]:
    """The lines' texts (tests and the crash report read them this way)."""
    return [line.text for line in lines]
