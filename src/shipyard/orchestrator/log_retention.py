"""Build log retention: old build logs are deleted by age and by count
(``shipyard serve --build-log-retention-days`` / ``--build-log-retention-count``).

Two kinds of build log pile up, one per build: each deployment's log
(``<data>/deployments/<id>/build.log``, what ``GET /deployments/{id}/logs`` serves) and each
builder's own (``<data>/logs/*.log``). Each kind keeps at most ``max_count`` files, newest first
by modification time, and none older than ``max_age_seconds``; the log of a deployment still
active is never deleted (its build may be writing it, and ``shipyard status`` may stream it).
With the 10 MiB cap per log, the defaults (30 days, 500 logs of each kind) bound the disk used.

``calculate_expired`` is pure; ``prune`` lists, decides and deletes (blocking: the janitor calls
it in a worker thread, at its first pass and then hourly).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_AGE_SECONDS = 30 * 24 * 3600.0
DEFAULT_MAX_COUNT = 500


@dataclass(frozen=True)
class LogRetention:
    #: Logs older than this are deleted; None: no age limit.
    max_age_seconds: float | None = DEFAULT_MAX_AGE_SECONDS
    #: Only the newest this many of each kind are kept; None: no count limit.
    max_count: int | None = DEFAULT_MAX_COUNT


@dataclass(frozen=True)
class LogFile:
    path: Path
    modified: float
    #: An active deployment's log: never deleted.
    protected: bool = False


def calculate_expired(files: Iterable[LogFile], now: float, retention: LogRetention) -> list[Path]:
    """The logs to delete: beyond the newest ``max_count`` or older than ``max_age_seconds``,
    never a protected one (protected logs still count towards ``max_count``)."""
    newest_first = sorted(files, key=lambda f: f.modified, reverse=True)
    expired: list[Path] = []
    for rank, f in enumerate(newest_first):
        if f.protected:
            continue
        too_many = retention.max_count is not None and rank >= retention.max_count
        too_old = (
            retention.max_age_seconds is not None and now - f.modified > retention.max_age_seconds
        )
        if too_many or too_old:
            expired.append(f.path)
    return expired


def prune(
    *,
    deployments_dir: Path | None,
    builder_logs_dir: Path | None,
    now: float,
    retention: LogRetention,
    active: Collection[str],
) -> list[Path]:
    """Delete expired logs of both kinds (see the module docstring); returns what was deleted."""
    deleted: list[Path] = []
    if deployments_dir is not None and deployments_dir.is_dir():
        logs = [
            _log_file(d / "build.log", protected=d.name in active)
            for d in deployments_dir.iterdir()
            if d.is_dir()
        ]
        for path in calculate_expired([f for f in logs if f], now, retention):
            if _remove(path):
                deleted.append(path)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only when nothing else is kept there
    if builder_logs_dir is not None and builder_logs_dir.is_dir():
        logs = [_log_file(p) for p in builder_logs_dir.glob("*.log")]
        for path in calculate_expired([f for f in logs if f], now, retention):
            if _remove(path):
                deleted.append(path)
    return deleted


def _log_file(path: Path, *, protected: bool = False) -> LogFile | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return LogFile(path, st.st_mtime, protected)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
