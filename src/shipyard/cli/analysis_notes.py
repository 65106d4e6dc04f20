"""One line about a canary analysis stage for ``shipyard deploy`` / ``status`` (``_stage_line`` in
cli/main.py): the last window's requests seen against those needed (``min_requests``) and its
verdict, and what the built-in load step did. Every value comes from the server and is shown
through ``cli.safe.shown``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shipyard.cli.safe import shown


def analysis_note(detail: Mapping[str, Any]) -> str:
    """``last window 12/20 requests (insufficient_data); load 20 rps to /: 180 answered, 0 5xx``;
    empty for a stage that measured nothing and ran no load."""
    parts: list[str] = []
    measured = detail.get("measurements")
    if isinstance(measured, list) and measured and isinstance(measured[-1], Mapping):
        m = measured[-1]
        if "needed" in m:
            parts.append(
                f"last window {m.get('requests', 0)}/{m['needed']} requests ({m.get('verdict')})"
            )
    load = detail.get("load")
    if isinstance(load, Mapping):
        if load.get("error"):
            parts.append(f"load: {load['error']}")
        else:
            parts.append(
                f"load {load.get('rps')} rps to {load.get('path')}: "
                f"{load.get('answered', 0)} answered, {load.get('status_5xx', 0)} 5xx"
            )
    return shown("; ".join(parts))
