"""Host rules and the host table of a shared listener. No sockets.

A service claims names on the agent's shared listeners with the manifest's ``[service] hosts``
(``"notes.example.com"``, ``"*.example.com"``, ``"example.com/api"``); ``agent.server`` parses
them here (:func:`parse_host_rule`, which says what is wrong with a bad one) and builds one
:class:`HostTable` for all services, which refuses two services claiming the same name and path.
``routing.entry``'s connections ask the table, once per distinct request head (the answer is
cached with the table, which is replaced whole on every change), which service a request is for.

Matching, as kamal-proxy and nginx do it: the request's host is the absolute-form target's
authority, else its ``Host`` field, lower-cased, without port or trailing dot. An exact name wins
over a wildcard (``*.example.com`` matches one more label: ``a.example.com``, not
``example.com`` nor ``a.b.example.com``, the way a wildcard certificate does); among one name's
rules, the longest path prefix that matches whole segments wins (``/api`` matches ``/api`` and
``/api/x``, not ``/apix``); a name with no matching prefix falls through to its wildcard.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from shipyard.domain.hostnames import LABEL, HostRule, parse_host_rule

__all__ = ["HostRule", "HostTable", "normalise_host", "parse_host_rule", "request_host"]

T = TypeVar("T")

# The label a wildcard stands for: a DNS label, so what matched is a name (safe in a Location).
_WILD_LABEL = re.compile(LABEL.encode())
# The Host field of a request head the router already accepted (http1 allows one at most).
_HOST_FIELD = re.compile(rb"\r\nhost:[ \t]*([^\r]*?)[ \t]*\r\n", re.IGNORECASE)
_TARGET = re.compile(rb"[^ ]+ ([^ ]+) ")
_ABSOLUTE_AUTHORITY = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


def normalise_host(value: bytes) -> bytes:
    """A request's host as the table keys it: lower case, no port, no trailing dot."""
    value = value.lower()
    if value[:1] == b"[":  # an IPv6 literal: its colons are not a port
        end = value.find(b"]")
        return value[: end + 1] if end >= 0 else value
    return value.partition(b":")[0].rstrip(b".")


def request_host(head: bytes) -> tuple[bytes, bytes]:
    """``(host, path)`` of a request head the router accepted: the host from an absolute-form
    target's authority, else the ``Host`` field (b"" when an HTTP/1.0 request sent none), as
    :func:`normalise_host` gives it; the path is the target up to its query."""
    m = _TARGET.match(head)
    target = m.group(1) if m is not None else b"/"
    authority = _ABSOLUTE_AUTHORITY.match(target)
    if authority is not None:
        host = authority.group(1)
        target = target[authority.end() :] or b"/"
    else:
        field = _HOST_FIELD.search(head)
        host = field.group(1) if field is not None else b""
    return normalise_host(host), target.partition(b"?")[0]


# Heads resolved per table: bounded like http1's head cache; longer heads are not kept.
_CACHE_SIZE = 1024
_CACHE_MAX_BYTES = 2048


class HostTable(Generic[T]):
    """Which value (a service's routing context) serves which host and path; immutable.

    ``rules`` maps each value to the rules it claims. Two values claiming the same rule: a
    ValueError naming both and the rule (the caller keeps its old table: nothing changes).
    """

    __slots__ = ("_exact", "_wild", "cache", "owners")

    def __init__(self, rules: Mapping[T, Iterable[HostRule]], names: Mapping[T, str]) -> None:
        """``names``: how each value is named in errors (its service)."""
        owners: dict[HostRule, T] = {}
        for value, claimed in rules.items():
            for rule in claimed:
                other = owners.get(rule)
                if other is not None and other != value:
                    raise ValueError(
                        f"host {rule} is already served by service {names[other]!r}; "
                        f"service {names[value]!r} cannot claim it too (remove it from one "
                        "[service] hosts list, or delete the other service first)"
                    )
                owners[rule] = value
        #: Every rule and the value that claimed it.
        self.owners = owners
        exact: dict[bytes, list[tuple[bytes, T]]] = {}
        wild: dict[bytes, list[tuple[bytes, T]]] = {}
        for rule, value in owners.items():
            if rule.wildcard:
                wild.setdefault(rule.host[2:].encode(), []).append((rule.path.encode(), value))
            else:
                exact.setdefault(rule.host.encode(), []).append((rule.path.encode(), value))
        for table in (exact, wild):
            for entries in table.values():
                entries.sort(key=lambda e: len(e[0]), reverse=True)  # longest prefix first
        self._exact = exact
        self._wild = wild
        #: head -> (value or None, host): a connection looks here first (one dict lookup).
        self.cache: dict[bytes, tuple[T | None, bytes]] = {}

    def match(self, host: bytes, path: bytes) -> T | None:
        """The value serving ``host`` (normalised) at ``path``, or None."""
        found = _longest(self._exact.get(host), path)
        if found is None:
            first, dot, parent = host.partition(b".")
            if dot and _WILD_LABEL.fullmatch(first) is not None:
                found = _longest(self._wild.get(parent), path)
        return found

    def resolve(self, head: bytes) -> tuple[T | None, bytes]:
        """``(value or None, host)`` for a request head, cached per head."""
        hit = self.cache.get(head)
        if hit is not None:
            return hit
        host, path = request_host(head)
        hit = (self.match(host, path), host)
        if len(head) <= _CACHE_MAX_BYTES:
            if len(self.cache) >= _CACHE_SIZE:
                self.cache.clear()
            self.cache[head] = hit
        return hit


def _longest(entries: list[tuple[bytes, T]] | None, path: bytes) -> T | None:
    if not entries:
        return None
    for prefix, value in entries:
        if not prefix or path == prefix or path.startswith(prefix + b"/"):
            return value
    return None
