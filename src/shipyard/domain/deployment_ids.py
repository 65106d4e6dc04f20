"""Deployment ids as people type them: a full id, or any unique prefix of one (like git's
abbreviated commits), at least ``MIN_PREFIX`` characters.

``reference_error`` says what is wrong with a reference that cannot name a deployment at all;
``choose`` decides, from the ids the store found with that prefix, which one it names, or raises
``NotFound`` (none) / ``AmbiguousDeploymentId`` (several, listing the ones the caller may see).
Called by the API's deployment routes (``api/app.py`` through ``Store.deployment_ids_with_prefix``)
and by ``shipyard audit show --deployment`` (cli/audit.py), which reads the store directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from shipyard.errors import AmbiguousDeploymentId, NotFound

#: Shortest prefix accepted: 4 hex digits are 65,536 values, so a prefix this short already
#: names one deployment among hundreds most of the time, and a shorter one rarely would.
MIN_PREFIX = 4
#: A full id is a UUID's 36 characters.
FULL_LENGTH = 36
#: What the API's path parameter accepts (a prefix of a UUID, either case).
PATTERN = rf"^[0-9a-fA-F-]{{{MIN_PREFIX},{FULL_LENGTH}}}$"
#: How many candidates an ambiguity error lists (the store is asked for one more).
SHOWN_CANDIDATES = 10

_REFERENCE = re.compile(PATTERN)


def normalise(reference: str) -> str:
    """The reference as ids are stored (lower case), or ``NotFound`` naming the rule when it
    cannot be a deployment id or a prefix of one."""
    if not _REFERENCE.fullmatch(reference):
        raise NotFound(
            f"{reference[:80]!r} is not a deployment id: give the id or at least its first "
            f"{MIN_PREFIX} characters (`shipyard history SERVICE` lists them)"
        )
    return reference.lower()


def choose(
    reference: str,
    matches: Sequence[tuple[str, str]],
    *,
    visible: Callable[[str], bool] = lambda _service: True,
) -> str:
    """The one id of ``matches`` (``(id, service)`` pairs starting with ``reference``).

    ``visible(service)``: whether the caller may read that service's deployments; an ambiguity
    error lists only those and counts the rest, so a prefix never reveals another service's ids.
    """
    if not matches:
        raise NotFound(
            f"no deployment id starts with {reference!r}; `shipyard history SERVICE` lists them"
        )
    if len(matches) == 1:
        return matches[0][0]
    shown = [i for i, service in matches if visible(service)][:SHOWN_CANDIDATES]
    more = len(matches) - len(shown)
    listing = ", ".join(shown) if shown else "none you may read"
    if more:
        listing += f" (and {more} more)" if shown else f" ({more} deployments)"
    raise AmbiguousDeploymentId(
        f"deployment id prefix {reference!r} is ambiguous: it starts {listing}; "
        "give more characters",
        candidates=shown,
    )
