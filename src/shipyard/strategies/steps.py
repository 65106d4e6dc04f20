"""The vocabulary of rollout plans: what a strategy asks the orchestrator's executors to do.

A strategy (``blue_green``, ``canary``, ``rolling``) is a pure function from its
parameters and the service's situation to a ``Plan``: a list of ``Step``s, plus what the strategy
alone knows and the rest of the deployment needs (``RollingLimits``: how a rolling update rolls
back). The orchestrator's executors (``orchestrator/steps/``, one per step type) run the steps
one by one through the Runtime and TrafficRouter protocols, persisting the index before each, so
a restarted control plane resumes at the same step: every step is idempotent. "stable" is the
revision serving before the deployment (blue), "candidate" the one being deployed (green).

A new step type is a dataclass here (and in ``Step``), its planner, and one executor module.
"""

from __future__ import annotations

from dataclasses import dataclass

from shipyard.analysis.policy import AnalysisPolicy


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
    """Route ``candidate`` percent of requests to the candidate, the rest to stable; verify it.

    ``sticky``: requests carrying the manifest's sticky key keep their side (canary stages)."""

    candidate: int
    name: str = "switch"
    sticky: bool = False


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


@dataclass(frozen=True)
class Analyse:
    """Hold the canary's weight for ``seconds`` while measuring it every interval with
    ``policy``; a failing analysis aborts (weight 0 at once), ``insufficient_data`` follows the
    policy (extend / pause / fail), ``inconclusive`` beyond its limit pauses for a human."""

    seconds: float
    stage: int
    weight: int
    policy: AnalysisPolicy
    name: str = "analysis"


@dataclass(frozen=True)
class AwaitPromotion:
    """A gate: wait for ``POST /deployments/{id}/promote`` (``.../abort`` rolls back)."""

    stage: int
    name: str = "gate"


@dataclass(frozen=True)
class ScaleCandidate:
    """Rolling: bring the candidate up to ``replicas`` replicas, health-gate the new ones, then
    route to them (weights proportional to each revision's ready replicas)."""

    replicas: int
    name: str = "scale_up"


@dataclass(frozen=True)
class ScaleStable:
    """Rolling: shrink stable to ``replicas`` replicas: re-weight first, then drain and stop the
    extra replicas (the runtime removes them from routing before stopping them)."""

    replicas: int
    name: str = "scale_down"


@dataclass(frozen=True)
class RunHook:
    """Run the manifest's ``[hooks] <point>`` command once in the candidate's artifact, sandbox
    and environment (``point``: pre_deploy, pre_switch or post_switch; ``post_rollback`` is the
    rollback's own). Placed by ``release_points.place``."""

    point: str
    name: str = "hook"


@dataclass(frozen=True)
class CallGate:
    """Ask the webhook gate ``gate`` (its name, see ``domain/release.gate_names``) at ``at``:
    a 2xx goes on, anything else does what the gate's ``on_timeout`` says."""

    at: str
    gate: str
    name: str = "webhook_gate"


Step = (
    StartCandidate
    | AwaitHealthy
    | Pause
    | SetWeight
    | Bake
    | KeepWarm
    | Analyse
    | AwaitPromotion
    | ScaleCandidate
    | ScaleStable
    | RunHook
    | CallGate
)


@dataclass(frozen=True)
class RollingLimits:
    """A rolling update's arithmetic, kept with its plan for the rollback: stable goes back to
    ``stable_replicas`` (its own count, which a release changing ``[run] replicas`` does not
    change) under the same ``max_surge`` / ``max_unavailable``, resolved to replica counts."""

    replicas: int
    stable_replicas: int
    max_surge: int
    max_unavailable: int


@dataclass(frozen=True)
class Plan:
    """What a strategy planned: the steps, and the parameters the rest of the deployment needs."""

    steps: tuple[Step, ...]
    #: Rolling updates: how the rollback restores stable (None: the rollback is a switch back).
    rolling: RollingLimits | None = None
    #: Whether the plan is worth announcing (``plan.created``): canary stages and rolling batches
    #: are; blue-green's steps are always the same.
    announce: bool = True
