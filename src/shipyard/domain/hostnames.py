"""Host rules: the names (and path prefixes) a service claims on the agent's shared listeners.

The grammar of ``[service] hosts`` (``domain.manifest``) and of what ``routing.hosts`` and
``routing.certificates`` match: a DNS name, lower case (``notes.example.com``), a wildcard one
label deep (``*.example.com``), optionally a path prefix (``example.com/api``). Here, below the
manifest, so a bad host is refused when the manifest is read, with the same words the agent uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LABEL", "HostRule", "parse_host_rule"]

#: One DNS label (RFC 1123), lower case.
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME = re.compile(rf"(?:\*\.)?{LABEL}(?:\.{LABEL})*")
# A path prefix: segments of RFC 3986 pchars (no query, no fragment), no empty segment.
_PATH = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")
_MAX_NAME = 253


@dataclass(frozen=True, slots=True, order=True)
class HostRule:
    """One claim: a DNS name (``*.`` first for a wildcard) and a path prefix ("" for all)."""

    host: str
    path: str = ""

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def __str__(self) -> str:
        return self.host + self.path


def parse_host_rule(text: str) -> HostRule:
    """``"example.com"``, ``"*.example.com"`` or ``"example.com/api"`` as a :class:`HostRule`
    (name lower-cased, a trailing ``/`` dropped); ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"host {text!r} must be a string")
    name, slash, path = text.partition("/")
    name = name.lower().removesuffix(".")
    if ":" in name:
        raise ValueError(
            f"host {text!r} has a port: name the host only (the listener's port is the agent's)"
        )
    if len(name) > _MAX_NAME or _NAME.fullmatch(name) is None:
        raise ValueError(
            f"host {text!r} is not a DNS name: labels of a-z, 0-9 and '-' (not first or last), "
            "dot-separated, optionally '*.' first for a wildcard, e.g. 'notes.example.com'"
        )
    if name.startswith("*.") and "." not in name[2:]:
        raise ValueError(f"host {text!r}: a wildcard needs at least two labels after '*.'")
    prefix = ("/" + path).rstrip("/") if slash else ""
    bad_path = _PATH.fullmatch(prefix) is None or bool({".", ".."} & set(prefix.split("/")))
    if prefix and bad_path:
        raise ValueError(
            f"host {text!r}: the path prefix must be '/'-separated segments of letters, "
            "digits and -._~!$&'()*+,;=:@%, without '.' or '..' segments, query or fragment"
        )
    return HostRule(name, prefix)
