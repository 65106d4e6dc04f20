"""What a request for replica logs may say, checked the same way by the API (``api/logs.py``) and
the CLI (``cli/logs.py``, before it asks the server): the ``since`` grammar and the shapes of
revision and replica names."""

from __future__ import annotations

import datetime as dt
import re

from shipyard.errors import InvalidInput

#: A revision name as a filter (what the orchestrator names revisions fits it).
REVISION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: A replica id (``<revision>-<n>-<hex>`` on the local agent).
REPLICA_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
#: ``since`` as a duration before now: a whole number and a unit.
DURATION = r"^([0-9]{1,9})(s|m|h|d)$"

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

SINCE_HELP = (
    "a duration before now (30s, 10m, 2h, 7d) or an ISO 8601 time "
    "(2026-01-31T14:00:00Z; without a zone it is UTC)"
)


def parse_since(text: str, now: float) -> float:
    """``since`` as seconds since the epoch; InvalidInput saying what is accepted otherwise."""
    value = text.strip()
    if m := re.fullmatch(DURATION, value):
        return now - int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"since {text[:64]!r} is not {SINCE_HELP}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
