"""Where the project's shared test data lives (``shared/data`` beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_pypa_db() -> Path | None:
    """The real PyPA advisory database: $SHIPYARD_TEST_OSV_DB, else ../shared/data, else /work."""
    candidates = [
        os.environ.get("SHIPYARD_TEST_OSV_DB"),
        str(ROOT.parent / "shared" / "data" / "pypa-advisory-db"),
        "/work/shared/data/pypa-advisory-db",
    ]
    for c in candidates:
        if c and (Path(c) / "vulns").is_dir():
            return Path(c)
    return None
