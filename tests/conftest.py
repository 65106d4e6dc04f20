"""Shared fixtures: nothing here starts processes; see tests/e2e/conftest.py for those."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

# The CLI's Rich consoles (cli/main.py's ``out`` and ``err``) fix their width when they are made,
# at import, if COLUMNS is set then; tests that need unwrapped output set COLUMNS for themselves
# (``monkeypatch.setenv``), which only works when nothing fixed it first. pytest-xdist's workers
# start with COLUMNS=80 and LINES=24 in their environment, and a terminal may export them too:
# the suite must not depend on the terminal that runs it.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

# No per-example deadline: it is a timing assertion, and this machine is shared and noisy (an
# example that takes 260 ms under load is not a failure). Hypothesis still bounds the examples.
settings.register_profile("shipyard", deadline=None)
settings.load_profile("shipyard")

#: The slowest tests (each starts servers, agents, apps or containers and waits on them: tens of
#: seconds to minutes) run first, so a run on several workers does not end with one worker still
#: busy with a long test the others finished waiting for. Stable: a module's tests stay together.
SLOW_FIRST = (
    "tests/e2e/test_containers.py",
    "tests/e2e/",
    "tests/fleet/",
    "tests/contract/",
    "tests/agent/test_containers.py",
)


#: Modules one xdist worker runs whole (``make test``'s ``--dist loadgroup``, scheduled by
#: ``pytest_xdist_make_scheduler`` below): each starts a stack once per module (a module-scoped
#: fixture: a control plane and agents, a PostgreSQL and two replicas, an image), and a worker
#: given only some of its tests would start its own.
ONE_WORKER_MODULES = frozenset(
    {
        "tests/e2e/test_containers.py",
        "tests/e2e/test_fleet.py",
        "tests/e2e/test_ha.py",
        "tests/e2e/test_release_hooks.py",
        "tests/agent/test_containers.py",
    }
)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, grouped here: xdist's own grouping (the ``xdist_group`` mark) is
    silently lost on pytest 9.2, whose node ids xdist can no longer suffix with the group
    (pytest-xdist #1386). Tests go out one at a time, a module of ``ONE_WORKER_MODULES`` as one
    unit; xdist hands out the largest units first, then the rest in collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    def split_scope(nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return module if module in ONE_WORKER_MODULES else nodeid

    scheduler = LoadScopeScheduling(config, log)
    scheduler._split_scope = split_scope  # the one thing loadscope asks of its subclasses
    return scheduler


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next((i for i, p in enumerate(SLOW_FIRST) if path.startswith(p)), len(SLOW_FIRST))

    items.sort(key=rank)


pytest_plugins = ["tests.docker_engine", "tests.oci_registry", "tests.images", "tests.postgres"]
