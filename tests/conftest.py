"""Shared fixtures: nothing here starts processes; see tests/e2e/conftest.py for those."""

from __future__ import annotations
