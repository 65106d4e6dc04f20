"""Showing untrusted text on a terminal: ``shown(text)`` is the one way the CLI prints a string
that came from the server, a repository or a build (service and revision names, repository
URLs, subjects, error messages, build log lines, stage names and details).

Two things in such a string can act on the terminal instead of being read: Rich markup
(``[bold red]...`` restyles the line, ``[link=...]`` makes a hyperlink) and control characters
(``\\x1b[2J`` clears the screen, ``\\x1b]0;...\\x07`` sets the window title, ``\\r`` and
``\\x1b[2K`` overwrite what was printed, so a repository could make ``Failed`` read ``Success``).
``shown`` replaces every C0 and C1 control character, DEL and the Unicode bidirectional
overrides (which reorder what is displayed: "Trojan Source") with a visible escape such as
``\\x1b``, then escapes the markup with ``rich.markup.escape``. Newlines (and tabs) are kept only
where a value is multi-line by nature (``multiline=True``: a build log chunk, an error message
with a log tail). Called by every module of ``shipyard.cli`` that prints such data.

A third thing Rich would interpret is an emoji code: ``:warning:`` in a build log line became
a glyph. ``console()`` makes the CLI's consoles (emoji codes off), so text prints as written.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape

#: C0 controls, DEL, C1 controls, and the bidi embeddings/overrides/isolates.
_BIDI = r"\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI}]")
#: The same but tab (\x09) and newline (\x0a), for values that are multi-line by nature.
_CONTROL_KEEP_LINES = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def neutralised(text: object, *, multiline: bool = False) -> str:
    """``text`` with its control characters replaced by visible escapes (no markup escaping:
    for output that Rich does not parse, e.g. ``typer.echo``)."""
    pattern = _CONTROL_KEEP_LINES if multiline else _CONTROL
    return pattern.sub(_visible, str(text))


def shown(text: object, *, multiline: bool = False) -> str:
    """``text`` safe to put inside a Rich markup string: control characters made visible,
    markup escaped. ``None`` and numbers are shown as ``str()`` would."""
    return escape(neutralised(text, multiline=multiline))


def console(**options: Any) -> Console:
    """A Rich console for the CLI: Rich's options, but emoji codes (``:smile:``) are never
    replaced, so a value that ``shown`` escaped prints exactly as it was written."""
    return Console(emoji=False, **options)
