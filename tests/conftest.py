"""Shared fixtures: nothing here starts processes; see tests/e2e/conftest.py for those."""

from __future__ import annotations

from hypothesis import settings

# No per-example deadline: it is a timing assertion, and this machine is shared and noisy (an
# example that takes 260 ms under load is not a failure). Hypothesis still bounds the examples.
settings.register_profile("shipyard", deadline=None)
settings.load_profile("shipyard")

pytest_plugins = ["tests.docker_engine", "tests.images"]
