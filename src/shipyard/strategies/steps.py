"""The vocabulary of rollout plans: what a strategy asks the orchestrator's executor to do.

A strategy (``blue_green``, later ``canary`` and ``rolling``) is a pure function from its
parameters and the service's situation to a list of ``Step``s. The executor
(``orchestrator/executor.py``) runs them one by one through the Runtime and TrafficRouter
protocols, persisting the index before each, so a restarted control plane resumes at the same
step: every step is idempotent. "stable" is the revision serving before the deployment (blue),
"candidate" the one being deployed (green).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartCandidate:
    """Start the candidate's replicas with no traffic."""

    name: str = "start"


@dataclass(frozen=True)
class AwaitHealthy:
    """Health-gate the candidate's replicas, then make them routable (still at weight 0)."""

    name: str = "health_check"


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` (resumable: the deadline is persisted)."""

    seconds: float
    name: str = "switch_delay"


@dataclass(frozen=True)
class SetWeight:
    """Route ``candidate`` percent of requests to the candidate, the rest to stable; verify it."""

    candidate: int
    name: str = "switch"


@dataclass(frozen=True)
class Bake:
    """Monitor the candidate's health for ``seconds``; an unhealthy verdict rolls back."""

    seconds: float
    name: str = "bake"


@dataclass(frozen=True)
class KeepWarm:
    """Deployment succeeded: keep stable running ``seconds`` for instant manual rollback, then
    stop it (done by the orchestrator's janitor, so the deployment can end now)."""

    seconds: float
    name: str = "scale_down"


Step = StartCandidate | AwaitHealthy | Pause | SetWeight | Bake | KeepWarm
