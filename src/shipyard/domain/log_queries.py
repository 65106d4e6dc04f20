"""What a request for replica logs may say, checked the same way by the API (``api/logs.py``) and
the CLI (``cli/logs.py``, before it asks the server): the ``since`` grammar and the shapes of
revision and replica names."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

from shipyard.errors import InvalidInput

#: A revision name as a filter (what the orchestrator names revisions fits it).
REVISION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: A replica id (``<revision>-<n>-<hex>`` on the local agent).
REPLICA_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
#: A follow cursor: ``replica:position`` pairs, comma-separated (every match is a valid one).
_PAIR = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}:[0-9]{1,18}"
CURSOR = rf"^({_PAIR}(,{_PAIR})*)?$"
#: ``since`` as a duration before now: a whole number and a unit.
DURATION = r"^([0-9]{1,9})(s|m|h|d)$"

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

SINCE_HELP = (
    "a duration before now (30s, 10m, 2h, 7d) or an ISO 8601 time "
    "(2026-01-31T14:00:00Z; without a zone it is UTC)"
)


#: The earliest and latest instants Python's datetime can name (a ``since`` past them is clamped).
_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC).timestamp()
_LATEST = dt.datetime.max.replace(tzinfo=dt.UTC).timestamp()


def format_cursor(cursor: Mapping[str, int]) -> str:
    """A runtime's ``LogBatch.cursor`` as the API and the CLI pass it (``CURSOR``)."""
    return ",".join(f"{replica}:{position}" for replica, position in sorted(cursor.items()))


def parse_cursor(text: str) -> dict[str, int]:
    """``format_cursor``'s text back; InvalidInput for anything else."""
    if not re.fullmatch(CURSOR, text):
        raise InvalidInput(
            "after is not a cursor: replica:position pairs separated by commas, as a logs "
            "answer gives it"
        )
    pairs = (item.rsplit(":", 1) for item in text.split(",") if item)
    return {replica: int(position) for replica, position in pairs}


def parse_since(text: str, now: float) -> float:
    """``since`` as seconds since the epoch; InvalidInput saying what is accepted otherwise.

    Every RFC 3339 date-time is accepted (the API's schema says ``format: date-time``): a
    lower-case ``t``/``z``, more than six digits of a second and a leap second ``:60`` included,
    which ``datetime.fromisoformat`` alone would refuse."""
    value = text.strip()
    if m := re.fullmatch(DURATION, value):
        return now - int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    normal = re.sub(r"(\.[0-9]{6})[0-9]+", r"\1", value.replace("t", "T").replace("z", "Z"))
    normal = re.sub(r"(T[0-9]{2}:[0-9]{2}):60", r"\1:59", normal)
    try:
        when = dt.datetime.fromisoformat(normal)
    except ValueError:
        raise InvalidInput(f"since {text[:64]!r} is not {SINCE_HELP}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        return when.timestamp()
    except (OverflowError, ValueError):  # an offset that takes it past year 1 or 9999
        return _EARLIEST if when.year < 1970 else _LATEST
