"""What a release needs around the switch, as ``shipyard.toml`` declares it: ``[hooks]`` (commands
run in the candidate's artifact at four points), ``[[gates]]`` (webhooks that must answer 2xx
before the deployment goes on) and ``[deploy]`` (what a failed check does: roll back or freeze).

Part of the manifest (``domain/manifest.py``); the orchestrator carries them out
(``strategies/release_points.py`` places hook and gate steps in the plan,
``orchestrator/steps/hooks.py`` and ``orchestrator/steps/gates.py`` run them, ``rollback.py``
runs ``post_rollback``, ``orchestrator/freezing.py`` freezes)::

    [hooks.pre_deploy]              # after build and scan, before any replica starts
    command = ["python", "manage.py", "migrate"]
    timeout_seconds = 300

    [hooks]                         # or a command alone, with the defaults
    post_switch = "python notify.py"

    [[gates]]
    url = "https://change.example.com/shipyard"
    at = "confirm_promotion"        # pre_rollout | pre_switch | confirm_promotion
    timeout_seconds = 30
    on_timeout = "pause"            # fail | pause

    [deploy]
    on_failure = "freeze"           # rollback (default) | freeze
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from shipyard.domain.commands import Command, command_text, to_argv
from shipyard.domain.models import WireModel
from shipyard.domain.repository_urls import has_credentials, redacted

#: Where a hook runs, in the order a deployment reaches them.
HookPoint = Literal["pre_deploy", "pre_switch", "post_switch", "post_rollback"]
HOOK_POINTS: tuple[HookPoint, ...] = ("pre_deploy", "pre_switch", "post_switch", "post_rollback")
#: Where a webhook gate is asked (Flagger's pre-rollout, Shipyard's pre-switch, Flagger's
#: confirm-promotion).
GatePoint = Literal["pre_rollout", "pre_switch", "confirm_promotion"]
GATE_POINTS: tuple[GatePoint, ...] = ("pre_rollout", "pre_switch", "confirm_promotion")


class HookSpec(WireModel):
    """One hook: a command run once per deployment in the candidate's artifact, sandbox and
    environment (a one-off container of the candidate image for images)."""

    shell: bool = Field(
        default=False,
        description="true: `command` is run by `/bin/sh -c` as written (still sandboxed).",
    )
    command: Command = Field(
        description="What to run, in the artifact's directory with the replicas' environment "
        "(`[run] env`, the service's secrets, `SHIPYARD_*`; no `PORT`). A string or an argv "
        "list, as `[run] command`.",
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=300.0,
        description="Seconds the hook may run; past them it is killed and counts as failed.",
    )
    on_failure: Literal["fail", "report"] | None = Field(
        default=None,
        description="`fail`: a failing hook fails the deployment (`pre_deploy`: it ends "
        "`Failed` with nothing changed; `pre_switch`, `post_switch`: it rolls back, or freezes "
        'with `[deploy] on_failure = "freeze"`). `report`: the failure is recorded, audited '
        "and notified, and the deployment goes on. Default: `fail` for `pre_*`, `report` for "
        "`post_*`.",
    )

    @field_validator("command")
    @classmethod
    def _runnable(cls, v: str | list[str], info: ValidationInfo) -> str | list[str]:
        to_argv(v, shell=bool(info.data.get("shell")), key="hooks.command")
        return v

    @property
    def argv(self) -> list[str]:
        return to_argv(self.command, shell=self.shell)

    @property
    def text(self) -> str:
        """The command as one line, for the deployment's log and the audit trail."""
        return command_text(self.command)

    def fatal(self, point: HookPoint) -> bool:
        """Whether a failure at ``point`` stops the deployment (``on_failure``'s default)."""
        if self.on_failure is not None:
            return self.on_failure == "fail"
        return point.startswith("pre_")


class HooksSection(WireModel):
    """Commands run at four points of a deployment; each a table or just a command."""

    pre_deploy: HookSpec | None = Field(
        default=None,
        description="After build and scan, before any replica of the candidate starts: "
        "schema migrations. A failure ends the deployment `Failed`; nothing was changed.",
    )
    pre_switch: HookSpec | None = Field(
        default=None,
        description="The candidate is healthy and has had no traffic yet: smoke tests, cache "
        "warming. A failure rolls back (or freezes).",
    )
    post_switch: HookSpec | None = Field(
        default=None,
        description="The candidate serves 100%: announcements, cache purges. A failure is "
        'reported (`on_failure = "fail"` rolls back instead).',
    )
    post_rollback: HookSpec | None = Field(
        default=None,
        description="A rollback put the previous revision back (run in the candidate's "
        "artifact, which knows what it changed): clean-up. A failure is reported.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _command_alone(cls, v: Any) -> Any:
        """``pre_deploy = "..."`` (or an argv list) means ``{command = ...}``."""
        return {"command": v} if isinstance(v, str | list) else v

    def at(self, point: HookPoint) -> HookSpec | None:
        hook: HookSpec | None = getattr(self, point)
        return hook


class GateSpec(WireModel):
    """A webhook gate: Shipyard POSTs the deployment's summary and goes on only on a 2xx."""

    url: Annotated[str, Field(min_length=1, max_length=2048)] = Field(
        description="http(s) URL POSTed the deployment's summary (JSON); a 2xx lets the "
        "deployment go on. No credentials in it: a token belongs in the receiver's own "
        "configuration, since the manifest is in the repository.",
    )
    at: GatePoint = Field(
        description="`pre_rollout`: before any replica of the candidate starts (after "
        "`pre_deploy`); `pre_switch`: the candidate is healthy, before its first traffic (after "
        "the `pre_switch` hook); `confirm_promotion`: before the candidate takes 100%.",
    )
    name: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None
    ) = Field(
        default=None,
        description="Names the gate in the record and the audit trail "
        "(default: `at` and the gate's position).",
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0, description="Seconds to wait for the answer."
    )
    on_timeout: Literal["fail", "pause"] = Field(
        default="fail",
        description="What a 4xx/5xx, a timeout or an unreachable receiver does: `fail` rolls "
        "back (or freezes; at `pre_rollout` the deployment ends `Failed`, nothing changed); "
        "`pause` pauses the deployment until a human promotes it (`shipyard promote`) or "
        "aborts it, while the gate is asked again every `timeout_seconds` and opens it on a 2xx.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if has_credentials(v):
            raise ValueError(
                f"gate url {redacted(v)} has credentials in it, and the manifest is in the "
                "repository: let the receiver authenticate Shipyard another way (an allow-list, "
                "mutual TLS) or give the URL an unguessable path"
            )
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gate url {v!r} must be an http:// or https:// URL with a host")
        return v


class DeploySection(WireModel):
    """What the deployment does when a check fails."""

    on_failure: Literal["rollback", "freeze"] = Field(
        default="rollback",
        description="`rollback`: a failed check (health gate, bake, analysis, a `pre_switch` "
        "hook or a gate) puts the stable revision back. `freeze`: for releases whose "
        "migration cannot be undone: traffic stays where it is, the deployment becomes "
        "`Frozen`, a notification fires, and only a human's `shipyard promote --reason` (go "
        "on) or `shipyard abort --reason` (roll back) ends it.",
    )


def gate_names(gates: list[GateSpec]) -> list[str]:
    """Each gate's name: its own, else ``<at>-<n>`` (n counts that point's gates from 1)."""
    seen: dict[str, int] = {}
    names: list[str] = []
    for gate in gates:
        seen[gate.at] = seen.get(gate.at, 0) + 1
        names.append(gate.name or f"{gate.at}-{seen[gate.at]}")
    return names


def check_gates(gates: list[GateSpec]) -> None:
    """ValueError unless every gate's name is unique (a record names a gate by it)."""
    names = gate_names(gates)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"[[gates]] names must be unique; repeated: {', '.join(dupes)}")
