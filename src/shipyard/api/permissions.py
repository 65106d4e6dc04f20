"""What a token's permission strings mean: ``base`` or ``base:scope``, scope a service glob.

A permission is one of ``PERMISSIONS`` (``deployment:create`` ...), optionally narrowed to the
services whose names match a scope: ``deployment:create:payments`` (one service),
``deployment:create:web-*`` (fnmatch-style, on the service name only). No scope means every
service. ``service:scale`` and ``service:delete`` (``shipyard scale``, ``shipyard service
delete``) are their own permissions, so an operator's deploy token cannot delete a service;
so is ``secret:write`` (``shipyard secret set/rm``, api/secrets.py), scoped the same way.
``token:admin`` (list and revoke tokens) and ``region:admin`` (add, list and remove remote
regions, api/regions.py) take no scope.

``parse`` validates one string and says what is wrong; ``TokenAuthority.issue`` and
``shipyard token create`` (cli/token.py) refuse bad ones with its message, ``api.auth.Claims``
keeps the parsed grants and answers "may this token do X to service S". Scopes use only ``*`` and
``?`` (no ``[...]`` classes), so a scope means the same in Python's ``fnmatchcase`` and in the
SQL ``LIKE`` it becomes (``store.db.glob_to_like``), which filters the deployment list in the
database on either backend.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from shipyard.errors import InvalidInput

#: Every permission and what it lets a token do (the words complete "may ...").
DESCRIPTIONS: dict[str, str] = {
    "deployment:create": "create and promote deployments",
    "deployment:rollback": "roll back and abort deployments",
    "deployment:read": "read deployments and services",
    "service:scale": "change a service's replica count (shipyard scale)",
    "service:delete": "delete a service: stop its replicas, remove its route",
    "token:admin": "list and revoke tokens",
    "region:admin": "add, list and remove remote regions (join tokens)",
    "secret:write": "set and remove a service's app secrets (never read them back)",
    "notifications:admin": "add, list, test and remove notification sinks",
}
PERMISSIONS: frozenset[str] = frozenset(DESCRIPTIONS)
#: The permissions that can be narrowed to services.
SCOPABLE: frozenset[str] = frozenset(
    {
        "deployment:create",
        "deployment:rollback",
        "deployment:read",
        "service:scale",
        "service:delete",
        "secret:write",
    }
)

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_SCOPE_CHARS = re.compile(r"[a-z0-9*?-]{1,63}")


def help_text() -> str:
    """The valid permissions for ``--help`` and error messages."""
    return (
        ", ".join(sorted(PERMISSIONS))
        + "; narrow a deployment permission to services with ':NAME' or ':GLOB' "
        + "(e.g. deployment:create:payments, deployment:create:web-*)"
    )


@dataclass(frozen=True, order=True)
class Permission:
    """One grant: ``base`` for the services matching ``scope`` (None: every service)."""

    base: str
    scope: str | None = None

    def __str__(self) -> str:
        return self.base if self.scope is None else f"{self.base}:{self.scope}"

    def covers(self, service: str) -> bool:
        return self.scope is None or fnmatch.fnmatchcase(service, self.scope)

    @property
    def everywhere(self) -> bool:
        """Whether it covers every service (no scope, or the scope ``*``)."""
        return self.scope is None or self.scope == "*"


def parse(text: str) -> Permission:
    """``text`` as a Permission; InvalidInput naming what is wrong and what would be right."""
    if not isinstance(text, str):
        raise InvalidInput(f"a permission is a string, not {type(text).__name__}")
    for base in sorted(PERMISSIONS, key=len, reverse=True):
        if text == base:
            return Permission(base)
        if text.startswith(base + ":"):
            return Permission(base, _scope(base, text[len(base) + 1 :]))
    raise InvalidInput(
        f"unknown permission {text[:80]!r}; valid: {help_text()}",
        unknown=[text[:80]],
        valid=sorted(PERMISSIONS),
    )


def parse_all(texts: Iterable[str]) -> frozenset[Permission]:
    """Every string parsed; the first bad one raises (so nothing is issued half right)."""
    return frozenset(parse(t) for t in texts)


def lenient(texts: Iterable[object]) -> frozenset[Permission]:
    """The grants in a verified token: strings this version cannot parse grant nothing."""
    out: set[Permission] = set()
    for t in texts:
        if isinstance(t, str):
            try:
                out.add(parse(t))
            except InvalidInput:
                continue
    return frozenset(out)


def _scope(base: str, scope: str) -> str:
    if base not in SCOPABLE:
        raise InvalidInput(
            f"{base!r} cannot be narrowed to services ('{base}:{scope[:63]}'); use '{base}'"
        )
    if not scope:
        raise InvalidInput(
            f"'{base}:' has an empty service scope; write '{base}' for every service or "
            f"'{base}:NAME' / '{base}:GLOB'"
        )
    # A glob of a service name: the name's own characters plus * and ?; with each wildcard read
    # as one letter it must still be a name, so a scope that can match nothing is refused.
    if not _SCOPE_CHARS.fullmatch(scope) or not _DNS_LABEL.fullmatch(
        scope.replace("*", "a").replace("?", "a")
    ):
        raise InvalidInput(
            f"service scope {scope[:63]!r} in '{base}:{scope[:63]}' is not a service name or a "
            "glob of one: service names are DNS labels (lowercase letters, digits and '-', not "
            "at either end, at most 63), and a glob may use '*' and '?'"
        )
    return scope
