"""What ``shipyard deploy`` / ``status`` print for a canary analysis stage: requests seen against
needed, the verdict, and the built-in load's counts, with server text shown safely."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.cli.analysis_notes import analysis_note
from shipyard.cli.main import _stage_line


@pytest.mark.parametrize(
    ("detail", "note"),
    [
        pytest.param({}, "", id="nothing-measured"),
        pytest.param(
            {"measurements": [{"verdict": "insufficient_data", "requests": 3, "needed": 20}]},
            "last window 3/20 requests (insufficient_data)",
            id="too-little-traffic",
        ),
        pytest.param(
            {
                "measurements": [
                    {"verdict": "insufficient_data", "requests": 3, "needed": 20},
                    {"verdict": "pass", "requests": 200, "needed": 20},
                ],
                "load": {"rps": 20, "path": "/", "answered": 400, "status_5xx": 0},
            },
            "last window 200/20 requests (pass); load 20 rps to /: 400 answered, 0 5xx",
            id="with-the-load",
        ),
        pytest.param(
            {"load": {"rps": 20, "path": "/", "error": "the fake runtime cannot drive load"}},
            "load: the fake runtime cannot drive load",
            id="load-unavailable",
        ),
        pytest.param(
            {"load": {"rps": 5, "path": "/[bold]x\x1b[2J", "answered": 1}},
            "load 5 rps to /\\[bold]x\\x1b[2J: 1 answered, 0 5xx",
            id="server-text-escaped",
        ),
    ],
)
def test_analysis_note(detail: dict[str, Any], note: str) -> None:
    assert analysis_note(detail) == note


def test_stage_line_shows_the_note_for_analysis_stages_only() -> None:
    detail = {"measurements": [{"verdict": "pass", "requests": 50, "needed": 20}]}
    analysis = {"name": "analysis_1", "status": "succeeded", "detail": detail}
    assert "last window 50/20 requests (pass)" in _stage_line(analysis)
    other = {"name": "canary_1", "status": "succeeded", "detail": detail}
    assert "last window" not in _stage_line(other)
