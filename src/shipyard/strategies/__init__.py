"""Rollout strategies as pure planners; ``plan`` dispatches on the request's strategy kind.

Called by the orchestrator's pre-flight; imports nothing that does I/O (import-linter enforces
it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shipyard.domain.models import BlueGreen, Canary, Rolling, strategy_params
from shipyard.strategies import blue_green, canary, rolling
from shipyard.strategies.rolling import InvalidPlan
from shipyard.strategies.steps import Plan

Planner = Callable[..., Plan]

#: kind -> planner(params, has_stable=..., **context). Context the orchestrator passes:
#: ``analysis_defaults`` (the manifest's [analysis]), ``replicas`` (desired, the manifest's
#: [run] replicas), ``stable_replicas`` (stable's ready replicas now) and ``stable_desired``
#: (stable's own replica count); planners ignore the rest.
PLANNERS: dict[str, Planner] = {
    "BlueGreen": blue_green.rollout,
    "Canary": canary.rollout,
    "Rolling": rolling.rollout,
}

__all__ = ["PLANNERS", "InvalidPlan", "Plan", "UnsupportedStrategy", "check", "plan"]


class UnsupportedStrategy(ValueError):
    pass


def check(strategy: BlueGreen | Canary | Rolling) -> None:
    """UnsupportedStrategy unless a planner is registered for the strategy's kind."""
    if strategy.kind not in PLANNERS:
        raise UnsupportedStrategy(
            f"strategy {strategy.kind} is not available; use one of {', '.join(PLANNERS)}"
        )


def plan(strategy: BlueGreen | Canary | Rolling, *, has_stable: bool, **context: Any) -> Plan:
    """The strategy's plan; ``InvalidPlan`` when it cannot be planned for this service."""
    check(strategy)
    return PLANNERS[strategy.kind](strategy_params(strategy), has_stable=has_stable, **context)
