"""Commands as ``shipyard.toml`` writes them (``[build]``, ``[run]``, ``[hooks]``): one string
split like a POSIX shell would but never run by one, an argv list, or with ``shell = true`` a
string run by ``/bin/sh -c``. ``to_argv`` is the one place a command becomes an argv; its
``ValueError`` says what to write instead. Used by ``domain/manifest.py`` and
``domain/release.py``."""

from __future__ import annotations

import json
import re
import shlex
from typing import Annotated

from pydantic import Field

#: A command: one string (split into arguments like a POSIX shell would, but never run by one,
#: unless ``shell = true``) or the argv list itself.
Command = (
    Annotated[str, Field(min_length=1, max_length=4096)]
    | Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=256)]
)


#: ``$(...)``, backquotes, ``${...}`` and ``$NAME``: expansions only a shell performs.
_EXPANSION = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*|\$[({]|`")
#: A word that is, or starts with, a redirection or a control operator ...
_OPERATOR_START = re.compile(r"^(?:\d*>>?&?\d*|\d*<|&&|\|\||\||;|&)")
#: ... or ends with a control operator (``make;`` ``a&&``).
_OPERATOR_END = re.compile(r"(?:;|&&|\|\||\|)$")


def shell_syntax(command: str) -> str | None:
    """The first piece of shell syntax in ``command`` outside quotes (an operator such as
    ``&&``, ``|``, ``;``, ``>``, or an expansion such as ``$(...)``, ``$PORT``), or None.

    Split without a shell, such a command would pass ``&&`` or ``$PORT`` to the program as a
    literal argument, never what was meant. Only whole-word operators count, so an argument like
    ``flask>=2`` or a URL's ``?a=1&b=2`` (meaningful to the program, not to us) stays allowed."""
    ops: list[str] = []  # unquoted characters; quoted ones as "x"
    exp: list[str] = []  # characters a shell would expand in: unquoted and double-quoted
    quote = ""
    i = 0
    while i < len(command):
        c = command[i]
        if quote == "'":
            quote = "" if c == "'" else quote
            ops.append("x")
            exp.append("x")
        elif c == "\\":
            ops.append("xx")
            exp.append("xx")
            i += 1
        elif quote == '"':
            quote = "" if c == '"' else quote
            ops.append("x")
            exp.append("x" if c == '"' else c)
        elif c in "'\"":
            quote = c
            ops.append("x")
            exp.append("x")
        else:
            ops.append(c)
            exp.append(c)
        i += 1
    for word in "".join(ops).split():
        found = _OPERATOR_START.match(word) or _OPERATOR_END.search(word)
        if found:
            return found.group(0)
    expansion = _EXPANSION.search("".join(exp))
    if expansion:
        text = expansion.group(0)
        return {"$(": "$(...)", "${": "${...}", "`": "`...`"}.get(text, text)
    return None


def to_argv(command: str | list[str], *, shell: bool, key: str = "command") -> list[str]:
    """The argv ``command`` runs as: ``["/bin/sh", "-c", command]`` with ``shell``, the list
    itself, or the string split like a POSIX shell would (``shlex``) but never run by one.
    ``ValueError`` says what to write instead (the validators' message)."""
    section, _, field = key.rpartition(".")
    where = f"[{section}] {field}" if section else field
    if isinstance(command, list):
        if shell:
            raise ValueError(
                f"{where} is an argv list, which is run as it is; shell = true needs the command "
                f'as one string (drop shell = true, or write {field} = "...")'
            )
        if not command or not command[0].strip():
            raise ValueError(f"{where}: the argv list's first element (the program) is empty")
        return list(command)
    if not command.strip():
        raise ValueError("command is empty")
    if shell:
        return ["/bin/sh", "-c", command]
    syntax = shell_syntax(command)
    if syntax is not None:
        shown = command if len(command) <= 200 else command[:200] + "..."
        raise ValueError(
            f"{where} {shown!r} uses shell syntax ({syntax}), but a command string is split "
            "into arguments and run without a shell, so it would reach the program literally. "
            f"To run it with a shell, add shell = true to [{section or 'run'}], or write the "
            f'argv list: {field} = ["sh", "-c", {json.dumps(command)}]'
        )
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot split command into arguments: {exc}") from exc
    if not argv:
        raise ValueError("command is empty")
    return argv


def command_text(command: str | list[str]) -> str:
    """A command as one line (a list joined with shell quoting), for provenance and logs."""
    return command if isinstance(command, str) else shlex.join(command)
