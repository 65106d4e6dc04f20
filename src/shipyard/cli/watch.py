"""``shipyard status TARGET --watch``: a live tree of a deployment (or of a service and the
deployment in flight on it), like ``kubectl argo rollouts get rollout --watch``.

Two halves, kept apart so the view can be tested on recorded documents:

- pure functions of the API's documents (``Snapshot``: ``GET /deployments/{id}`` and
  ``GET /services/{name}``): ``render`` builds the Rich tree (stages done, current and still
  to come with their durations, weights and replicas per revision, every analysis measurement
  in words, warnings, the error, and the next thing a human can do), ``facts`` the same state
  as keyed plain lines, and ``exit_code`` what the command ends with;
- the loop (``Poller`` fetches, ``run`` redraws with Rich ``Live`` on a terminal, or prints each
  fact that changed as a plain line when stdout is not one), ended by a terminal deployment
  status (exit 0 for ``Success``, 1 otherwise) or Ctrl-C (130: the deployment goes on).

Every value from the server is shown as a Rich ``Text`` (never parsed as markup) after
``safe.neutralised`` made its control characters visible. Called by ``shipyard status`` in
``cli/main.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text
from rich.tree import Tree

from shipyard.cli.client import ApiClient
from shipyard.cli.safe import neutralised
from shipyard.errors import InvalidInput

Doc = Mapping[str, Any]

TERMINAL = frozenset({"Success", "Failed", "RolledBack"})
#: Measurements shown under a running or failed analysis stage in the tree (plain output prints
#: every one).
MEASUREMENTS_SHOWN = 5
#: Exit code of a watch stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

_STAGE_MARK = {
    "succeeded": ("✔", "green"),
    "failed": ("✖", "red"),
    "skipped": ("⊘", "dim"),
    "running": ("◷", "yellow"),
    "pending": ("○", "dim"),
}
_STATUS_STYLE = {
    "Success": "bold green",
    "Failed": "bold red",
    "RolledBack": "bold red",
    "RollingBack": "bold red",
    "Paused": "bold magenta",
    "Frozen": "bold cyan",
}
#: An analysis stage's tallies (``AnalysisRun``) as its line shows them.
_TALLIES = (
    ("passed", "passed"),
    ("failed", "failed"),
    ("inconclusive", "inconclusive"),
    ("insufficient", "insufficient data"),
    ("errors", "errors"),
    ("extensions", "extension(s)"),
)
_VERDICT_STYLE = {"pass": "green", "fail": "red", "error": "red"}


@dataclass(frozen=True)
class Snapshot:
    """What the view shows at one moment: the deployment (None when watching a service with
    nothing in flight), the service (None before its first deployment made it), and a problem
    reaching the server (the view keeps the last documents and says so)."""

    deployment: Doc | None
    service: Doc | None
    problem: str | None = None


def _counted(tallies: Mapping[str, object]) -> str:
    """An analysis's tallies in words ("3 passed, 1 failed"), or that none were taken."""
    counted = [
        f"{_s(tallies.get(key))} {word}"
        for key, word in _TALLIES
        if isinstance(tallies.get(key), int) and tallies[key]
    ]
    return ", ".join(counted) or "no measurements"


def _s(value: object) -> str:
    """A server-given value as plain, neutralised text."""
    return neutralised("" if value is None else value)


def _t(value: object, style: str = "") -> Text:
    return Text(_s(value), style=style)


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def duration(ms: float) -> str:
    """``0.4s``, ``12.3s``, ``2m05s``, ``1h02m``: short and readable."""
    seconds = max(ms, 0) / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _stage_ms(stage: Doc, now: datetime) -> float | None:
    if stage.get("duration_ms") is not None:
        return float(stage["duration_ms"])
    started = _when(stage.get("started_at"))
    if stage.get("status") == "running" and started is not None:
        return (now - started).total_seconds() * 1000
    return None


# --- the deployment's stages -------------------------------------------------------------------


@dataclass(frozen=True)
class StageView:
    """One line of the stage list: a recorded stage, or a planned step not started yet."""

    name: str
    status: str  # a stage's status, or "pending"
    detail: Doc = field(default_factory=dict)
    stage: Doc | None = None
    planned: Doc | None = None


def _plan(doc: Doc) -> list[Doc]:
    progress = doc.get("progress") or {}
    plan = progress.get("plan") or {}
    return list(plan.get("steps") or [])


def stage_views(doc: Doc) -> list[StageView]:
    """The recorded stages, then (while the deployment runs its plan) the planned steps still to
    come. A planned step is matched to its recorded stage by name, so a stage shows what its
    plan said (the weight of a canary stage, the analysis policy) beside what happened."""
    plan = _plan(doc)
    by_name = {str(p.get("name")): p for p in plan}
    views = [
        StageView(
            str(st.get("name")),
            str(st.get("status")),
            st.get("detail") or {},
            st,
            by_name.get(str(st.get("name"))),
        )
        for st in doc.get("stages") or []
    ]
    progress = doc.get("progress") or {}
    if doc.get("status") in TERMINAL or progress.get("rolling_back") or not plan:
        return views
    step = int(progress.get("step") or 0)
    if progress.get("phase") == "steps" and step < len(plan):
        current = plan[step].get("name")
        last = views[-1] if views else None
        if last is not None and last.name == current and last.status == "running":
            step += 1
    elif progress.get("phase") != "steps":
        step = 0
    views += [StageView(str(p.get("name")), "pending", {}, None, p) for p in plan[step:]]
    return views


def _min_requests(view: StageView, measurement: Doc) -> Any:
    if measurement.get("min_requests") is not None:
        return measurement["min_requests"]
    policy = (view.planned or {}).get("policy") or (view.detail.get("tallies") or {}).get("policy")
    return (policy or {}).get("min_requests")


def _percent(rate: object) -> str:
    return f"{float(rate) * 100:.2f}%" if isinstance(rate, int | float) else "-"


def _ms(value: object) -> str:
    return f"{float(value):.1f} ms" if isinstance(value, int | float) else "-"


def measurement_text(view: StageView, number: int, m: Doc) -> str:
    """One analysis measurement in words: its verdict, requests seen and needed, success rate,
    p99 (and stable's, when compared), and the reasons; a ``[[analysis.metrics]]`` measurement
    from a provider: the metric (and region), its value and the reasons."""
    if m.get("metric") is not None and m.get("provider") not in (None, "router"):
        where = f"@{_s(m['region'])}" if m.get("region") is not None else ""
        value = json.dumps(m["value"]) if "value" in m else "no value"
        text = f"#{number} {_s(m.get('verdict'))}: {_s(m['metric'])}{where} = {_s(value)}"
        reasons = [r for r in m.get("reasons") or [] if r]
        return text + (" - " + "; ".join(_s(r) for r in reasons) if reasons else "")
    needed = _min_requests(view, m)
    requests = m.get("requests", 0)
    plural = "" if requests == 1 else "s"
    parts = [f"#{number} {_s(m.get('verdict'))}:", f"{_s(requests)} request{plural}"]
    if needed is not None:
        parts[-1] += f" (need {_s(needed)})"
    if m.get("success_rate") is not None or m.get("p99_ms") is not None:
        parts.append(f"success {_percent(m.get('success_rate'))}, p99 {_ms(m.get('p99_ms'))}")
    if m.get("stable_requests") is not None:
        parts.append(
            f"stable {_s(m['stable_requests'])} requests, success "
            f"{_percent(m.get('stable_success_rate'))}, p99 {_ms(m.get('stable_p99_ms'))}"
        )
    text = ", ".join([" ".join(parts[:2]), *parts[2:]])
    reasons = [r for r in m.get("reasons") or [] if r]
    if reasons:
        text += " - " + "; ".join(_s(r) for r in reasons)
    return text


def _stage_note(view: StageView) -> str:
    """What a stage line says after its name: its weight, what it found, its error."""
    d, p = view.detail, view.planned or {}
    notes: list[str] = []
    weight = d.get("candidate_weight", p.get("candidate"))
    if weight is None and p.get("type") == "Analyse":
        weight = d.get("weight", p.get("weight"))
    if weight is not None:
        notes.append(f"{_s(weight)}%")
    if p.get("type") in ("Analyse", "Bake", "Pause") or "seconds" in d:
        seconds = d.get("seconds", p.get("seconds"))
        if isinstance(seconds, int | float) and view.status in ("running", "pending"):
            notes.append(f"for {duration(seconds * 1000)}")
    if p.get("type") in ("ScaleCandidate", "ScaleStable") or "replicas" in d:
        replicas = d.get("replicas", p.get("replicas"))
        if isinstance(replicas, int):
            notes.append(f"to {_s(replicas)} replica(s)")
    if view.name == "queued" and view.status == "running" and "position" in d:
        notes.append(f"position {_s(d['position'])} for a build slot")
    if d.get("verdict") is not None:
        notes.append(f"verdict {_s(d['verdict'])}")
    per_metric = d.get("metrics")
    if isinstance(per_metric, Mapping):  # [[analysis.metrics]]: each metric's own tallies
        for name, counts in per_metric.items():
            if isinstance(counts, Mapping):
                notes.append(f"{_s(name)} ({_counted(counts)})")
    tallies = d.get("tallies")
    if isinstance(tallies, Mapping):
        notes.append(f"({_counted(tallies)})")
    if d.get("analysis") == "skipped":
        notes.append(f"analysis skipped: {_s(d.get('reason'))}")
    if d.get("promoted_by") is not None:
        notes.append(f"promoted by {_s(d['promoted_by'])}")
    if d.get("restored") is not None:
        notes.append(f"restored {_s(d['restored'])}")
    if d.get("error"):
        notes.append(_s(d["error"]))
    return "  ".join(notes)


def _stage_label(view: StageView, now: datetime) -> Text:
    mark, style = _STAGE_MARK.get(view.status, ("?", ""))
    label = Text.assemble(
        (f"{mark} ", style), (_s(view.name), "bold" if view.status == "running" else "")
    )
    ms = _stage_ms(view.stage, now) if view.stage is not None else None
    if ms is not None:
        label.append(f"  {duration(ms)}", style="cyan")
    note = _stage_note(view)
    if note:
        label.append(f"  {note}", style="red" if view.status == "failed" else "")
    return label


# --- revisions, replicas, the next action --------------------------------------------------------


def _roles(deployment: Doc | None, service: Doc | None) -> dict[str, str]:
    """Each revision worth showing, newest role first: the candidate, stable, then the rest."""
    roles: dict[str, str] = {}
    if deployment is not None:
        rollback = deployment.get("kind") == "rollback"
        canary = "Canary" in (deployment.get("strategy") or {})
        green, blue = deployment.get("green_revision"), deployment.get("blue_revision")
        if green:
            roles[str(green)] = "restored" if rollback else "canary" if canary else "new"
        if blue:
            roles.setdefault(str(blue), "rolled back from" if rollback else "stable")
    if service is not None:
        if service.get("serving_revision"):
            roles.setdefault(str(service["serving_revision"]), "serving")
        if service.get("warm_revision"):
            roles.setdefault(str(service["warm_revision"]), "warm")
        for revision in service.get("weights") or {}:
            roles.setdefault(str(revision), "")
        for replica in service.get("replicas") or []:
            roles.setdefault(str(replica.get("revision")), "")
    return roles


def _replica_text(r: Doc) -> str:
    ready = "ready" if r.get("ready") else "not ready"
    restarts = _s(r.get("restarts", 0))
    text = f"{_s(r.get('replica_id'))}  {_s(r.get('state'))}, {ready}, {restarts} restart(s)"
    if r.get("exit_code") is not None:
        text += f", last exit code {_s(r['exit_code'])}"
    return text


def next_action(deployment: Doc | None, service: Doc | None) -> str:
    """What a human can do now, as a sentence with the command to run."""
    if deployment is None:
        name = _s((service or {}).get("service"))
        return f"no deployment in flight on {name}; watching until Ctrl-C"
    dep_id, status = _s(deployment.get("id")), deployment.get("status")
    progress = deployment.get("progress") or {}
    if status == "Paused":
        why = progress.get("paused")
        return (
            f"paused{f' ({_s(why)})' if why else ''}: run `shipyard promote {dep_id}` to go on "
            f"or `shipyard abort {dep_id}` to roll back"
        )
    if status == "Frozen":
        return (
            f"{frozen_line(deployment)}; traffic stays where it is: run "
            f"`shipyard promote {dep_id} --reason TEXT` to go on after the failed step or "
            f"`shipyard abort {dep_id} --reason TEXT` to roll back"
        )
    if status == "RollingBack":
        return "rolling back: traffic goes back to the stable revision; nothing to do"
    if status == "Success":
        if deployment.get("kind") == "deploy" and deployment.get("blue_revision"):
            return f"done: `shipyard rollback {dep_id}` puts {_s(deployment['blue_revision'])} back"
        return "done"
    if status in TERMINAL:
        blue = deployment.get("blue_revision")
        serves = f"; {_s(deployment.get('service'))} serves {_s(blue)}" if blue else ""
        return f"ended {_s(status)}{serves}: fix the cause and deploy again"
    if deployment.get("kind") == "deploy":
        return f"in progress: `shipyard abort {dep_id}` rolls it back now"
    return "in progress"


def frozen_line(deployment: Doc) -> str:
    """Why a Frozen deployment waits (``[deploy] on_failure = "freeze"``): the failed step and
    its error, as ``next_action`` and ``shipyard status`` print it."""
    frozen = (deployment.get("progress") or {}).get("frozen") or {}
    cause = frozen.get("cause") or {}
    steps = (((deployment.get("progress") or {}).get("plan")) or {}).get("steps") or []
    step = frozen.get("step")
    name = steps[step].get("name") if isinstance(step, int) and 0 <= step < len(steps) else None
    where = f" at {_s(name)}" if name else ""
    why = f": {_s(cause.get('code'))}: {_s(cause.get('message'))}" if cause else ""
    return f"frozen{where}{why}"


def fleet_lines(deployment: Doc | None) -> list[str]:
    """A fleet deployment's regions (state, and why one is unreachable) and its switches'
    skew, one line each; nothing for one region. ``shipyard status`` prints them too."""
    fleet = (deployment or {}).get("fleet")
    if not isinstance(fleet, dict):
        return []
    out: list[str] = []
    for name, region in (fleet.get("regions") or {}).items():
        why = f"  ({_s(region.get('error'))})" if region.get("error") else ""
        out.append(f"region {_s(name)}: {_s(region.get('state'))}{why}")
    skews = [s.get("skew_ms") for s in fleet.get("switches") or []]
    if skews:
        each = ", ".join(f"{_s(ms)} ms" for ms in skews)
        out.append(f"switch skew: max {_s(max(skews))} ms over {len(skews)} switch(es) ({each})")
    return out


def _header(deployment: Doc | None, service: Doc | None) -> Text:
    if deployment is not None:
        strategy = ", ".join(_s(k) for k in deployment.get("strategy") or {})
        status = _s(deployment.get("status"))
        return Text.assemble(
            (f"{_s(deployment.get('service'))}@{_s(deployment.get('region'))}", "bold"),
            f"  {_s(deployment.get('kind'))} {_s(deployment.get('id'))}  {strategy}  ",
            (status, _STATUS_STYLE.get(status, "bold cyan")),
        )
    svc = service or {}
    return Text.assemble(
        (f"{_s(svc.get('service'))}@{_s(svc.get('region'))}", "bold"),
        f"  serving {_s(svc.get('serving_revision'))}  {_s(svc.get('url'))}",
    )


def render(snapshot: Snapshot, now: datetime) -> RenderableType:
    """The whole view at ``now`` (durations of running stages are measured to it)."""
    dep, svc = snapshot.deployment, snapshot.service
    tree = Tree(_header(dep, svc), guide_style="dim")
    tree.add(Text.assemble(("next: ", "bold"), _s(next_action(dep, svc))))
    if dep is not None:
        lines = fleet_lines(dep)
        if lines:
            regions = tree.add(Text("fleet", style="bold"))
            for line in lines:
                regions.add(Text(line, style="red" if "unreachable" in line else ""))
        stages = tree.add(Text("stages", style="bold"))
        for view in stage_views(dep):
            node = stages.add(_stage_label(view, now))
            # A passed analysis is summed up on its line (the tallies); the running one and a
            # failed one list their last measurements, which say what is happening or went wrong.
            measurements = (
                list(view.detail.get("measurements") or []) if view.status != "succeeded" else []
            )
            first = max(len(measurements) - MEASUREMENTS_SHOWN, 0)
            if first:
                node.add(Text(f"... {first} earlier measurement(s)", style="dim"))
            for i, m in enumerate(measurements[first:], start=first + 1):
                node.add(
                    Text(
                        measurement_text(view, i, m),
                        style=_VERDICT_STYLE.get(m.get("verdict"), "yellow"),
                    )
                )
    revisions = tree.add(Text("revisions", style="bold"))
    weights = (svc or {}).get("weights") or {}
    replicas = list((svc or {}).get("replicas") or [])
    for revision, role in _roles(dep, svc).items():
        node = revisions.add(
            Text.assemble(
                (_s(revision), "bold"),
                f" ({_s(role)})" if role else "",
                ("  weight ", ""),
                (f"{_s(weights.get(revision, 0))}%", "cyan"),
            )
        )
        for r in replicas:
            if str(r.get("revision")) == revision:
                node.add(Text(_replica_text(r), style="" if r.get("ready") else "red"))
    warnings = list((svc or {}).get("warnings") or [])
    for warning in warnings:
        tree.add(Text.assemble(("warning: ", "yellow"), _s(warning)))
    error = (dep or {}).get("error")
    if error:
        tree.add(
            Text.assemble(
                (f"{_s(error.get('type'))}: ", "bold red"),
                neutralised(error.get("message", ""), multiline=True),
            )
        )
    if snapshot.problem:
        tree.add(Text.assemble(("server: ", "yellow"), _s(snapshot.problem)))
    return Group(tree)


def facts(snapshot: Snapshot) -> list[tuple[str, str]]:
    """The state as ``(key, line)`` pairs for output that cannot redraw: a line is printed when
    its key is new or its text changed. Only finished stages carry a duration, so a running
    stage is one line when it starts and one when it ends."""
    dep, svc = snapshot.deployment, snapshot.service
    out: list[tuple[str, str]] = []
    if dep is not None:
        out.append(
            (
                "status",
                f"{_s(dep.get('service'))}@{_s(dep.get('region'))} {_s(dep.get('id'))}: "
                f"{_s(dep.get('status'))}",
            )
        )
        for line in fleet_lines(dep):
            out.append((f"fleet:{line.partition(':')[0]}", line))
        for i, view in enumerate(stage_views(dep)):
            if view.status == "pending":
                continue
            ms = view.stage.get("duration_ms") if view.stage is not None else None
            took = f" {duration(ms)}" if ms is not None else ""
            note = _stage_note(view)
            out.append(
                (
                    f"stage:{i}",
                    f"stage {_s(view.name)} {view.status}{took}{f'  {note}' if note else ''}",
                )
            )
            for j, m in enumerate(view.detail.get("measurements") or [], start=1):
                out.append(
                    (f"measurement:{i}:{j}", f"  {_s(view.name)} {measurement_text(view, j, m)}")
                )
    if svc is not None:
        weights = svc.get("weights") or {}
        shown = ", ".join(f"{_s(r)} {_s(w)}%" for r, w in weights.items())
        out.append(("weights", f"weights {shown or '-'}"))
        for r in svc.get("replicas") or []:
            out.append(
                (
                    f"replica:{_s(r.get('replica_id'))}",
                    f"replica {_s(r.get('revision'))} {_replica_text(r)}",
                )
            )
        for w in svc.get("warnings") or []:
            out.append((f"warning:{_s(w)}", f"warning: {_s(w)}"))
    error = (dep or {}).get("error")
    if error:
        message = neutralised(error.get("message", ""), multiline=True)
        out.append(("error", f"error: {_s(error.get('type'))}: {message}"))
    if snapshot.problem:
        out.append(("problem", f"server: {_s(snapshot.problem)}"))
    out.append(("next", f"next: {next_action(dep, svc)}"))
    return out


def exit_code(deployment: Doc | None) -> int | None:
    """None while the deployment runs; 0 when it ended ``Success``, 1 otherwise."""
    if deployment is None or deployment.get("status") not in TERMINAL:
        return None
    return 0 if deployment["status"] == "Success" else 1


class Changes:
    """Remembers the facts already printed; ``new`` answers the lines to print now."""

    def __init__(self) -> None:
        self._printed: dict[str, str] = {}

    def new(self, snapshot: Snapshot) -> list[str]:
        lines, now = [], dict(facts(snapshot))
        for key in [k for k in self._printed if k not in now]:
            del self._printed[key]
            if key.startswith("replica:"):  # the others only ever change, never vanish
                lines.append(f"replica {key.removeprefix('replica:')} removed")
        for key, line in now.items():
            if self._printed.get(key) != line:
                self._printed[key] = line
                lines.append(line)
        return lines


# --- the loop ------------------------------------------------------------------------------------


class WatchError(Exception):
    """The target cannot be watched (unknown, no permission): the message says why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _problem(resp: Any) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"{resp.status_code}: {resp.text[:200]}"
    detail = body.get("detail") or body.get("message") or body
    return f"{resp.status_code} {body.get('error', '')}: {detail}"


class Poller:
    """Fetches the documents of one watch target through the API: a deployment id (and its
    service), or a service name (and the deployment in flight on it, followed to its end).

    A first answer that refuses the target raises ``WatchError``; later failures (the server
    restarting, a timeout) become ``Snapshot.problem`` on the last documents seen."""

    def __init__(self, client: ApiClient, target: str, region: str, *, is_id: bool) -> None:
        self.client, self.target, self.region, self.is_id = client, target, region, is_id
        self.last = Snapshot(None, None)
        #: The deployment a service watch saw in flight (followed until it ends).
        self.followed: str | None = target if is_id else None
        self._first = True

    def _get(self, path: str, *, missing_ok: bool = False) -> Doc | None:
        resp = self.client.request("GET", path)
        if resp.status_code == 404 and missing_ok:
            return None
        if resp.status_code >= 400:
            message = _problem(resp)
            if self._first or resp.status_code < 500:
                raise WatchError(message, 1 if resp.status_code >= 500 else 2)
            raise InvalidInput(message)
        doc: Doc = resp.json()
        return doc

    def poll(self) -> Snapshot:
        try:
            snapshot = self._fetch()
        except InvalidInput as exc:  # unreachable, timed out, a 5xx: keep watching
            if self._first:
                raise WatchError(exc.message, 2) from exc
            snapshot = Snapshot(self.last.deployment, self.last.service, exc.message)
        self._first = False
        self.last = snapshot
        return snapshot

    def _fetch(self) -> Snapshot:
        if self.is_id:
            dep = self._get(f"/api/v1/deployments/{self.target}")
            assert dep is not None
            svc = self._get(
                f"/api/v1/services/{dep['service']}?region={dep['region']}", missing_ok=True
            )
            return Snapshot(dep, svc)
        svc = self._get(f"/api/v1/services/{self.target}?region={self.region}")
        assert svc is not None
        active = svc.get("active_deployment")
        if active:
            self.followed = str(active)
        if self.followed is None:
            return Snapshot(None, svc)
        dep = self._get(f"/api/v1/deployments/{self.followed}")
        return Snapshot(dep, svc)


def run(
    poll: Callable[[], Snapshot],
    console: Console,
    *,
    interval: float,
    live: bool,
    pause: Callable[[float], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> int:
    """Poll every ``interval`` seconds and show each snapshot: redrawn in place with ``live``,
    else as plain lines of what changed. Returns the exit code (``exit_code``, or
    ``INTERRUPTED`` after Ctrl-C)."""
    snapshots = _until_terminal(poll, interval, pause or sleep)
    code: int | None = None
    try:
        if live:
            with Live(console=console, auto_refresh=False, transient=False) as view:
                for snap in snapshots:
                    view.update(render(snap, clock()), refresh=True)
                    code = exit_code(snap.deployment)
        else:
            changes = Changes()
            for snap in snapshots:
                for line in changes.new(snap):
                    console.out(line, highlight=False)
                code = exit_code(snap.deployment)
    except KeyboardInterrupt:
        console.print("stopped watching (the deployment goes on)", markup=False, highlight=False)
        return INTERRUPTED
    return code if code is not None else 0


def sleep(seconds: float) -> None:
    """The wait between two polls (tests replace it)."""
    time.sleep(seconds)


def _until_terminal(
    poll: Callable[[], Snapshot], interval: float, pause: Callable[[float], None]
) -> Iterator[Snapshot]:
    while True:
        snap = poll()
        yield snap
        if exit_code(snap.deployment) is not None:
            return
        pause(interval)


def watch(
    client: ApiClient,
    target: str,
    region: str,
    *,
    is_id: bool,
    interval: float,
    console: Console,
) -> int:
    """``shipyard status TARGET --watch``: the exit code (raises ``WatchError``)."""
    poller = Poller(client, target, region, is_id=is_id)
    poller.poll()  # a refused target is an error before anything is drawn
    first = [poller.last]

    def poll() -> Snapshot:
        return first.pop() if first else poller.poll()

    return run(poll, console, interval=interval, live=console.is_terminal)
