"""One unprivileged uid per service, allocated from a configured range and kept on disk.

``Sandbox.identity`` asks ``UidAllocator.uid_for(service)``; the first ask allocates the lowest
free uid of the range and records it in a JSON file in the data directory (written by
``private_files.write_private`` under an ``fcntl`` lock, so the control plane's builder and the
agent, which share the data directory, never hand one uid to two services). A service keeps its
uid for good: its builds and its replicas run as the same identity, and two services never share
one. The default range, 200000-299999, lies above the ranges Debian gives users and
``/etc/subuid`` (100000-165535 for the first user) so no login account or rootless container of
the host owns those uids.
"""

from __future__ import annotations

import fcntl
import json
import re
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import InvalidInput, PermanentError
from shipyard.private_files import write_private

_RANGE = re.compile(r"^(\d+)-(\d+)$")


class UidRangeExhausted(PermanentError):
    """Every uid of the configured range belongs to a service already."""

    code = "uid_range_exhausted"


@dataclass(frozen=True)
class UidRange:
    """An inclusive range of uids for workloads (never 0, never below 1000)."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 1000 or self.last < self.first or self.last >= 2**31:
            raise InvalidInput(
                f"uid range {self.first}-{self.last} must be FIRST-LAST with "
                "1000 <= FIRST <= LAST < 2^31 (e.g. 200000-299999)"
            )

    @classmethod
    def default(cls) -> UidRange:
        return cls(200000, 299999)

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """``"200000-299999"`` -> ``UidRange``; ``InvalidInput`` saying what is expected."""
        m = _RANGE.match(text.strip())
        if m is None:
            raise InvalidInput(f"uid range {text!r} must look like 200000-299999")
        return cls(int(m.group(1)), int(m.group(2)))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


class UidAllocator:
    """service -> uid, persistent in ``path`` (see the module docstring)."""

    def __init__(self, path: Path, uid_range: UidRange) -> None:
        self.path = path
        self.range = uid_range

    def uid_for(self, service: str) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with lock.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            table = self._read()
            uid = table.get(service)
            if isinstance(uid, int) and uid in self.range:
                return uid
            taken = {u for u in table.values() if isinstance(u, int)}
            uid = next(
                (u for u in range(self.range.first, self.range.last + 1) if u not in taken), None
            )
            if uid is None:
                raise UidRangeExhausted(
                    f"all {self.range.last - self.range.first + 1} uids of {self.range} belong "
                    "to services; widen --sandbox-uids"
                )
            table[service] = uid
            write_private(self.path, json.dumps(table, indent=1, sort_keys=True))
            return uid

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PermanentError(
                f"cannot read the sandbox uid table {self.path}: {exc}; fix or remove it "
                "(services then get new uids)"
            ) from exc
        return (
            {str(k): v for k, v in data.items() if isinstance(v, int)}
            if isinstance(data, dict)
            else {}
        )
