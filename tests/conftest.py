"""Shared fixtures: nothing here starts processes; see tests/e2e/conftest.py for those."""

from __future__ import annotations

import os

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

pytest_plugins = ["tests.docker_engine", "tests.oci_registry", "tests.images"]
