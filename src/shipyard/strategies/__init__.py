"""Rollout strategies as pure planners; ``plan`` dispatches on the request's strategy kind.

Called by the orchestrator; imports nothing that does I/O (import-linter enforces it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shipyard.domain.models import BlueGreen, Canary, Rolling, strategy_params
from shipyard.strategies import blue_green
from shipyard.strategies.steps import Step

Planner = Callable[..., list[Step]]

#: kind -> planner(params, has_stable=...) ; canary and rolling register here when they land.
PLANNERS: dict[str, Planner] = {"BlueGreen": blue_green.plan}


class UnsupportedStrategy(ValueError):
    pass


def plan(strategy: BlueGreen | Canary | Rolling, *, has_stable: bool, **context: Any) -> list[Step]:
    planner = PLANNERS.get(strategy.kind)
    if planner is None:
        raise UnsupportedStrategy(f"strategy {strategy.kind} is not available yet; use BlueGreen")
    return planner(strategy_params(strategy), has_stable=has_stable, **context)
