"""The ``shipyard`` command (Typer + Rich): the terminal edge of the API.

    shipyard serve     control plane: API + orchestrator (cli/daemons.py, with `agent`)
    shipyard agent     data plane of one region: router + app supervisor (`agent stop` stops it)
    shipyard deploy    build and roll out a repository, with live stage progress
    shipyard status    one deployment, or a service (--watch: live, until the deployment ends)
    shipyard history   a service's deployments
    shipyard logs      what a service's replicas print (stdout, stderr), --follow
    shipyard rollback  put a service back on the revision before a deployment
    shipyard promote   let a Paused (canary gate) or Frozen (--reason) deployment go on
    shipyard abort     abort a deployment in flight: traffic back on stable at once
    shipyard scale     change a service's replica count without a deployment (cli/services.py)
    shipyard service   delete a service (cli/services.py)
    shipyard secret    a service's app secrets: set (from stdin), list, rm (cli/secrets.py)
    shipyard audit     verify / prove / show the hash-chained audit trail
    shipyard token     create API tokens
    shipyard keys      export the artifact-signing public key (for verifiers)
    shipyard demo      the whole story on this machine in under a minute

Exit codes: 0 success, 1 the operation failed (deployment not Success, audit tampered, ...),
2 bad input (with a message saying what to fix).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.table import Table

from shipyard.cli import agent_ctl, daemons
from shipyard.cli.analysis_notes import analysis_note
from shipyard.cli.audit import audit_app
from shipyard.cli.build import build_app
from shipyard.cli.client import (
    DEFAULT_SERVER,
    ApiClient,
    is_local,
    resolve_token,
    source_defaults,
    trace_context,
)
from shipyard.cli.common import OptDataDir, Server, Token, err, fail
from shipyard.cli.db import db_app
from shipyard.cli.keys import keys_app
from shipyard.cli.logs import logs_app
from shipyard.cli.notifications import notification_lines, notifications_app
from shipyard.cli.regions import region_app
from shipyard.cli.safe import console, shown
from shipyard.cli.secrets import secret_app
from shipyard.cli.security import security_app
from shipyard.cli.services import services_app
from shipyard.cli.strategy_flags import strategy_from_flags
from shipyard.cli.token import token_app
from shipyard.domain import deployment_ids
from shipyard.domain.manifest import MANIFEST_NAME, parse_manifest
from shipyard.domain.models import DNS_LABEL
from shipyard.errors import InvalidInput, ManifestError, ShipyardError

app = typer.Typer(
    name="shipyard",
    help="Zero-downtime deployments: build, scan, sign, roll out, verify, roll back, audit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(keys_app, name="keys")
app.add_typer(security_app)  # scan, vulndb
app.add_typer(build_app)  # build
app.add_typer(services_app)  # scale, service delete
#: ``shipyard agent`` runs the agent; ``shipyard agent stop`` stops a running one.
agent_app = typer.Typer()
agent_app.callback(invoke_without_command=True)(daemons.agent)
agent_app.command("stop")(agent_ctl.stop)
app.add_typer(agent_app, name="agent")
app.command()(daemons.serve)
app.add_typer(logs_app)  # logs
app.add_typer(region_app, name="region")  # region add/list/remove (cli/regions.py)
app.add_typer(secret_app, name="secret")  # secret set/list/rm (cli/secrets.py)
app.add_typer(notifications_app, name="notifications")  # list/add/rm/test (cli/notifications.py)

out = console()

Format = Annotated[str, typer.Option("--format", help="table or json.")]


#: What ``--ca-cert`` (an option of ``shipyard`` itself, before the command) said; ``_client``
#: hands it to every ApiClient. Set on every invocation by ``_root``.
_trust: dict[str, Path | None] = {"ca_cert": None}


@app.callback()
def _root(
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            "--ca-cert",
            envvar="SHIPYARD_CA_CERT",
            help="Trust this PEM CA for an https --server (a private CA); before the command.",
        ),
    ] = None,
) -> None:
    """Options for every command that talks to a server."""
    _trust["ca_cert"] = ca_cert


def _client(server: str, token: str | None, data_dir: Path | None, *perms: str) -> ApiClient:
    try:
        return ApiClient(server, resolve_token(token, data_dir, list(perms)), _trust["ca_cert"])
    except InvalidInput as exc:
        raise fail(exc.message) from exc


def _check(resp: Any) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = {"detail": resp.text}
        detail = body.get("detail") or body.get("message") or body
        raise fail(
            f"{resp.status_code} {body.get('error', '')}: {detail}",
            1 if resp.status_code >= 500 else 2,
        )
    return resp.json()


# --- deployments ---------------------------------------------------------------------------------


@app.command()
def deploy(
    repository: Annotated[
        str, typer.Argument(help="Git URL or local path of the service's repository.")
    ],
    branch: Annotated[
        str | None,
        typer.Option(
            help="Default: the repository's HEAD branch (the checked-out one of a local path, "
            "the default one of a remote), as `shipyard build`."
        ),
    ] = None,
    commit: Annotated[str | None, typer.Option(help="Default: the branch head.")] = None,
    service: Annotated[
        str | None, typer.Option(help="Default: \\[service] name of shipyard.toml.")
    ] = None,
    region: Annotated[
        list[str] | None,
        typer.Option(help="Region; repeat it to deploy a fleet in lockstep (default: local)."),
    ] = None,
    strategy: Annotated[str, typer.Option(help="blue-green, canary or rolling.")] = "blue-green",
    stages: Annotated[
        str,
        typer.Option(
            help="canary: WEIGHT:SECONDS[:pause] stages, comma-separated, e.g. '10:60,50:60:pause'."
        ),
    ] = "10:60,50:60",
    max_surge: Annotated[str, typer.Option(help="rolling: N or P% extra replicas.")] = "25%",
    max_unavailable: Annotated[
        str, typer.Option(help="rolling: N or P% replicas allowed unready.")
    ] = "0",
    switch_delay: Annotated[int, typer.Option(help="Seconds between healthy and the switch.")] = 0,
    bake: Annotated[float, typer.Option(help="Post-switch monitoring window, seconds.")] = 30.0,
    scale_down_delay: Annotated[
        float, typer.Option(help="Keep the old revision warm, seconds.")
    ] = 30.0,
    wait: Annotated[bool, typer.Option(help="Follow progress until the deployment ends.")] = True,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Build afresh: reuse no cached artifact, dependency environment or image layer.",
        ),
    ] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
    format: Format = "table",
) -> None:
    """Deploy a commit (blue-green, canary or rolling); exits 0 only if it ends Success.

    With TRACEPARENT set (a CI job's trace), the deployment's trace continues it."""
    try:
        repo, branch, commit, manifest_text = source_defaults(repository, branch, commit)
        if service is None:
            service = _service_from(repo, branch, commit, manifest_text)
        strategy_body = strategy_from_flags(
            strategy,
            stages=stages,
            max_surge=max_surge,
            max_unavailable=max_unavailable,
            switch_delay=switch_delay,
            bake=bake,
            scale_down_delay=scale_down_delay,
        )
    except (InvalidInput, ManifestError) as exc:
        raise fail(exc.message) from exc
    regions = list(dict.fromkeys(region or ["local"]))
    target: dict[str, Any] = {"service_name": service, "region": regions[0]}
    if len(regions) > 1:  # a fleet (a Shipyard extension); one region stays the ADR's body
        target = {"service_name": service, "regions": regions}
    body: dict[str, Any] = {
        "source": {"repository": repo, "branch": branch, "commit": commit},
        "target": target,
        "strategy": strategy_body,
    }
    if rebuild:  # only when asked: servers that predate the field accept the body unchanged
        body["rebuild"] = True
    client = _client(server, token, data_dir, "deployment:create", "deployment:read")
    accepted = _check(
        client.request("POST", "/api/v1/deploy", json=body, headers=trace_context(os.environ))
    )
    dep_id = accepted["deployment_id"]
    if format != "json":
        err.print(
            f"deployment [bold]{shown(dep_id)}[/bold]: {shown(service)} {shown(commit[:10])} "
            f"({shown(branch)}) -> {shown(', '.join(regions))}"
        )
    if not wait:
        out.print(shown(json.dumps(accepted) if format == "json" else dep_id))
        return
    final = follow(client, dep_id, quiet=format == "json")
    if format == "json":
        out.print_json(data=final)
    raise typer.Exit(0 if final["status"] == "Success" else 1)


def _service_from(repo: str, branch: str, commit: str, manifest_text: str | None) -> str:
    """``[service] name`` of the commit's manifest, for ``deploy`` without ``--service``; the
    errors say which commit was read (or that a remote's manifest cannot be read from here)."""
    at = f"commit {commit[:12]} (branch {branch})"
    if not is_local(repo):
        raise InvalidInput(
            f"{repo} is a remote repository: its {MANIFEST_NAME} is read by the server, so give "
            "the service's name with --service"
        )
    if manifest_text is None:
        raise InvalidInput(
            f"no {MANIFEST_NAME} at {at} of {repo} to take the service name from; add one "
            "(see README) or pass --service"
        )
    return parse_manifest(manifest_text, origin=f"{MANIFEST_NAME} at {at}").service.name


def follow(
    client: ApiClient,
    deployment_id: str,
    *,
    quiet: bool = False,
    since: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Poll a deployment, streaming its build log and printing each stage as it starts and
    ends; returns the final document. ``since``: the deployment as it was before the caller
    acted on it (promote, abort): only what changes after it is printed, no stage or build log
    line again."""
    seen: dict[tuple[str, int], str] = {}
    status = ""
    log_offset, log_open = 0, True
    if since is not None:
        seen = {(st["name"], i): st["status"] for i, st in enumerate(since["stages"])}
        status = since["status"]
        log_open = status in ("Pending", "Building")
        log_offset = _log_end(client, deployment_id) if log_open else 0
    while True:
        doc = _check(client.request("GET", f"/api/v1/deployments/{deployment_id}"))
        if not quiet:
            if log_open:
                log_offset, log_open = _print_build_log(client, deployment_id, log_offset)
            if doc["status"] != status:
                status = doc["status"]
                err.print(f"  status  [cyan]{shown(status)}[/cyan]")
            for i, st in enumerate(doc["stages"]):
                key = (st["name"], i)
                if seen.get(key) != st["status"]:
                    seen[key] = st["status"]
                    err.print("  " + _stage_line(st))
        if doc["status"] in ("Success", "Failed", "RolledBack") or _newly_frozen(doc, since):
            if not quiet:
                _print_outcome(doc)
            return dict(doc)
        time.sleep(0.2)


def _newly_frozen(doc: dict[str, Any], since: dict[str, Any] | None) -> bool:
    """Whether the deployment is Frozen, and not by the freeze ``since`` showed (a promote of a
    Frozen deployment is followed until it ends or freezes again): following stops there, as a
    human decides what comes next, however long that takes."""
    frozen = (doc.get("progress") or {}).get("frozen")
    before = ((since or {}).get("progress") or {}).get("frozen")
    return doc["status"] == "Frozen" and frozen is not None and frozen != before


def _log_end(client: ApiClient, deployment_id: str) -> int:
    """Where the build log ends now: the API answers an offset past the end with the end."""
    resp = client.request("GET", f"/api/v1/deployments/{deployment_id}/logs",
                          params={"offset": 2**62})  # fmt: skip
    return int(resp.json()["offset"]) if resp.status_code == 200 else 0


def _print_build_log(client: ApiClient, deployment_id: str, offset: int) -> tuple[int, bool]:
    """Print the build log written since ``offset``; (new offset, whether more may come)."""
    resp = client.request("GET", f"/api/v1/deployments/{deployment_id}/logs",
                          params={"offset": offset})  # fmt: skip
    if resp.status_code != 200:
        return offset, False
    chunk = resp.json()
    # Only "\n" ends a line: splitlines() would also break at "\r" (and \x1c-\x1e, \x85),
    # and a log's "\r" is shown, not obeyed.
    for line in chunk["text"].removesuffix("\n").split("\n") if chunk["text"] else ():
        err.print(f"  [dim]build |[/dim] {shown(line)}", highlight=False)
    return int(chunk["offset"]), bool(chunk["building"] or chunk["text"])


def _stage_line(st: dict[str, Any]) -> str:
    """One stage as ``follow`` and ``status`` print it (every server-given value shown safely);
    a deployment waiting for a build slot says where it is in the queue."""
    color = {"running": "yellow", "succeeded": "green", "failed": "red"}.get(st["status"], "white")
    dur = f" {st['duration_ms']} ms" if st.get("duration_ms") is not None else ""
    detail = st.get("detail") or {}
    note = shown(detail.get("error") or "", multiline=True)
    if st["name"] == "queued" and st["status"] == "running" and "position" in detail:
        note = f"position {shown(detail['position'])} for a build slot"
    if st["name"].startswith("analysis_"):
        note = " ".join(filter(None, (analysis_note(detail), note)))
    status = shown(f"{st['status']:>9}")
    return f"[{color}]{status}[/{color}] {shown(st['name'])}{dur} {note}".rstrip()


def _print_outcome(doc: dict[str, Any]) -> None:
    m = doc.get("metrics") or {}
    if doc["status"] == "Success":
        res = doc.get("result") or {}
        err.print(
            f"[green]Success[/green]: {shown(doc['service'])} serves {shown(res.get('revision'))} "
            f"at {shown(res.get('url'))}"
            f" ({shown(m.get('total_duration_ms'))} ms)"
        )
    elif doc["status"] == "Frozen":
        from shipyard.cli.watch import next_action

        err.print(f"[cyan]Frozen[/cyan]: {shown(next_action(doc, None))}")
    else:
        e = doc.get("error") or {}
        err.print(
            f"[red]{shown(doc['status'])}[/red]: {shown(e.get('type', ''))}: "
            f"{shown(e.get('message', ''), multiline=True)}"
        )
        if m.get("detection_to_rollback_ms") is not None:
            err.print(
                f"  unhealthy verdict -> traffic back on {shown(doc.get('blue_revision'))}: "
                f"{shown(m['detection_to_rollback_ms'])} ms"
            )


@app.command()
def status(
    target: Annotated[
        str, typer.Argument(help="A deployment id (or a unique prefix of one) or a service name.")
    ],
    region: str = "local",
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
    format: Format = "table",
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="Follow it live until the deployment ends (exit 1 unless it ends Success).",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, max=60, help="--watch: seconds between refreshes.")
    ] = 1.0,
) -> None:
    """Show a deployment (stages, durations, error) or a service (revision, weights, replicas)."""
    client = _client(server, token, data_dir, "deployment:read")
    if watch and format == "json":
        raise fail("--watch draws a view; for JSON poll `shipyard status ... --format json`")
    if watch:
        _watch_target(client, target, region, interval=interval)
    doc, is_id = _deployment_or_service(client, target, region)
    if format == "json":
        out.print_json(data=doc)
        return
    if is_id:
        out.print(
            f"[bold]{shown(doc['id'])}[/bold] {shown(doc['kind'])} "
            f"{shown(doc['service'])}@{shown(doc['region'])}: "
            f"[cyan]{shown(doc['status'])}[/cyan]  "
            f"{shown(doc.get('blue_revision'))} -> {shown(doc.get('green_revision'))}"
        )
        if doc.get("driver"):  # the replica driving it (several control-plane replicas)
            driver = doc["driver"]
            out.print(
                f"  driven by {shown(driver['replica'])} "
                f"(lease until {shown(driver['lease_expires_at'])})"
            )
        if doc.get("fleet"):  # each region's state and the switches' skew
            from shipyard.cli.watch import fleet_lines

            for line in fleet_lines(doc):
                out.print("  " + shown(line))
        for st in doc["stages"]:
            out.print("  " + _stage_line(st))
        if doc["status"] == "Frozen":
            from shipyard.cli.watch import next_action

            out.print(f"  [cyan]{shown(next_action(doc, None))}[/cyan]")
        if doc.get("error"):
            e = doc["error"]
            out.print(
                f"  [red]{shown(e.get('type'))}[/red]: {shown(e.get('message'), multiline=True)}"
            )
        for line in notification_lines(doc):  # each sink's delivery state
            out.print("  " + shown(line))
        out.print(f"  metrics: {shown(json.dumps(doc['metrics']))}")
        return
    out.print(
        f"[bold]{shown(doc['service'])}[/bold]@{shown(doc['region'])} {shown(doc['url'])} serving "
        f"{shown(doc['serving_revision'])} weights {shown(doc['weights'])}"
    )
    # ids whole, never cut with an ellipsis: they are what `shipyard logs --replica` takes
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("replica", "revision", "state", "ready", "restarts", "port"):
        table.add_column(column, no_wrap=True)
    for r in doc["replicas"]:
        table.add_row(
            shown(r["replica_id"]),
            shown(r["revision"]),
            shown(r["state"]),
            "yes" if r["ready"] else "[red]no[/red]",
            shown(r.get("restarts", 0)),
            shown(r["port"]),
        )
    out.print(table)
    troubled = [r for r in doc["replicas"] if not r["ready"] or r.get("restarts", 0)]
    if troubled:
        out.print(
            f"what a replica printed: shipyard logs {shown(doc['service'])} "
            f"--replica {shown(troubled[0]['replica_id'])}"
        )
    for warning in doc.get("warnings", []):
        err.print(f"[yellow]warning:[/yellow] {shown(warning)}")


def _watch(
    client: ApiClient, target: str, region: str, *, is_id: bool, interval: float
) -> NoReturn:
    """``status --watch``: the live view of ``cli/watch.py``; exits with its code."""
    from shipyard.cli import watch

    try:
        code = watch.watch(client, target, region, is_id=is_id, interval=interval, console=out)
    except watch.WatchError as exc:
        raise fail(exc.message, exc.code) from exc
    raise typer.Exit(code)


def _watch_target(client: ApiClient, target: str, region: str, *, interval: float) -> NoReturn:
    """``status --watch TARGET``: a full deployment id or a plain service name is watched as it
    is (the view reads it itself); a prefix of an id is resolved to its deployment first."""
    if len(target) == deployment_ids.FULL_LENGTH and re.fullmatch(deployment_ids.PATTERN, target):
        _watch(client, target, region, is_id=True, interval=interval)
    if not re.fullmatch(deployment_ids.PATTERN, target):
        _watch(client, target, region, is_id=False, interval=interval)
    doc, is_id = _deployment_or_service(client, target, region)
    _watch(client, doc["id"] if is_id else target, region, is_id=is_id, interval=interval)


def _deployment_or_service(
    client: ApiClient, target: str, region: str
) -> tuple[dict[str, Any], bool]:
    """``status``'s target: a deployment (its id or a unique prefix of it) or a service; (the
    document, whether it is a deployment). Something that could be both (``cafe``) is tried as a
    deployment first, then as a service, so a service named like hex digits still works."""
    if re.fullmatch(deployment_ids.PATTERN, target):
        resp = client.request("GET", f"/api/v1/deployments/{target}")
        full_id = len(target) == deployment_ids.FULL_LENGTH
        if resp.status_code != 404 or full_id or not re.fullmatch(DNS_LABEL, target):
            return _check(resp), True
    return _check(
        client.request("GET", f"/api/v1/services/{target}", params={"region": region})
    ), False


@app.command()
def history(
    service: Annotated[str, typer.Argument(help="Service name.")],
    limit: int = 20,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
    format: Format = "table",
) -> None:
    """A service's deployments, newest first."""
    client = _client(server, token, data_dir, "deployment:read")
    docs = _check(
        client.request("GET", "/api/v1/deployments", params={"service": service, "limit": limit})
    )
    if format == "json":
        out.print_json(data=docs)
        return
    table = Table("created")
    # Ids are what the other commands take: never cut or folded, whatever the terminal's width
    # (the other columns shrink instead).
    table.add_column("id", no_wrap=True, min_width=36)
    for heading in ("kind", "status", "revision", "by", "ms"):
        table.add_column(heading, overflow="fold")
    for d in docs["deployments"]:
        table.add_row(
            shown(d["created_at"][:19]),
            shown(d["id"]),
            shown(d["kind"]),
            shown(d["status"]),
            shown(d.get("green_revision") or ""),
            shown(d["triggered_by"]),
            shown((d.get("metrics") or {}).get("total_duration_ms") or ""),
        )
    out.print(table)


@app.command()
def rollback(
    deployment_id: Annotated[
        str, typer.Argument(help="The deployment to undo (its id or a unique prefix).")
    ],
    wait: bool = True,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Put the service back on the revision that served before DEPLOYMENT_ID."""
    client = _client(server, token, data_dir, "deployment:rollback", "deployment:read")
    accepted = _check(client.request("POST", f"/api/v1/rollback/{deployment_id}"))
    undone = _check(client.request("GET", f"/api/v1/deployments/{deployment_id}"))["id"]
    err.print(f"rollback [bold]{shown(accepted['deployment_id'])}[/bold] of {shown(undone)}")
    _follow_and_exit(client, accepted["deployment_id"], wait, success="Success")


def _follow_and_exit(
    client: ApiClient,
    deployment_id: str,
    wait: bool,
    *,
    success: str,
    since: dict[str, Any] | None = None,
) -> None:
    """With ``wait``, follow the deployment to its end (from ``since``, see ``follow``); exit 0
    only if it ends ``success``."""
    if wait:
        final = follow(client, deployment_id, since=since)
        raise typer.Exit(0 if final["status"] == success else 1)


def _current(client: ApiClient, deployment_id: str, wait: bool) -> dict[str, Any] | None:
    """The deployment before promote/abort acts (what following it then leaves out)."""
    if not wait:
        return None
    doc: dict[str, Any] = _check(client.request("GET", f"/api/v1/deployments/{deployment_id}"))
    return doc


#: ``promote`` and ``abort``: why (required for a Frozen deployment; audited).
Reason = Annotated[
    str | None,
    typer.Option(
        "--reason",
        help="Why (audited). Required for a Frozen deployment (\\[deploy] on_failure = "
        '"freeze"), optional otherwise.',
    ),
]


def _decision(reason: str | None) -> dict[str, Any]:
    """The request's body: ``{"reason": ...}`` when one was given, else none."""
    if reason is None:
        return {}
    if not reason.strip():
        raise fail("--reason is empty: say why, it is audited")
    return {"json": {"reason": reason}}


@app.command()
def promote(
    deployment_id: Annotated[
        str, typer.Argument(help="A Paused or Frozen deployment (its id or a unique prefix).")
    ],
    reason: Reason = None,
    wait: bool = True,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Let a Paused deployment (a canary stage's gate, an analysis or a webhook gate waiting for
    a human) go on, or a Frozen one go on after its failed step (with --reason)."""
    client = _client(server, token, data_dir, "deployment:create", "deployment:read")
    body = _decision(reason)
    before = _current(client, deployment_id, wait)
    accepted = _check(
        client.request("POST", f"/api/v1/deployments/{deployment_id}/promote", **body)
    )
    deployment_id = accepted["deployment_id"]  # the full id of a prefix
    err.print(f"promoted [bold]{shown(deployment_id)}[/bold]")
    _follow_and_exit(client, deployment_id, wait, success="Success", since=before)


@app.command()
def abort(
    deployment_id: Annotated[
        str, typer.Argument(help="A deployment in flight (its id or a unique prefix).")
    ],
    reason: Reason = None,
    wait: bool = True,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Abort a deployment in flight: the candidate's weight goes to 0 now, then it rolls back
    (a Frozen one only with --reason)."""
    client = _client(server, token, data_dir, "deployment:rollback", "deployment:read")
    body = _decision(reason)
    before = _current(client, deployment_id, wait)
    accepted = _check(client.request("POST", f"/api/v1/deployments/{deployment_id}/abort", **body))
    deployment_id = accepted["deployment_id"]  # the full id of a prefix
    err.print(f"aborting [bold]{shown(deployment_id)}[/bold]")
    _follow_and_exit(client, deployment_id, wait, success="RolledBack", since=before)


@app.command()
def demo(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Default: a fresh temp dir.")
    ] = None,
    port: Annotated[int, typer.Option(help="API port (0 = any free one).")] = 0,
    containers: Annotated[bool, typer.Option(help="On Docker Engine (README).")] = False,
    fleet: Annotated[
        bool, typer.Option(help="Three joined regions in lockstep (README: Regions).")
    ] = False,
) -> None:
    """v1 -> v2 blue-green and v3 canary under load (0 failed), broken v4 rolled back, audit."""
    from shipyard.cli.demo import run_demo
    from shipyard.cli.demo_containers import run_container_demo
    from shipyard.cli.demo_fleet import run_fleet_demo

    run = run_fleet_demo if fleet else run_container_demo if containers else run_demo
    raise typer.Exit(run(data_dir, port, err))


def main() -> None:
    try:
        app()
    except ShipyardError as exc:
        err.print(f"[red]error:[/red] {shown(exc.message, multiline=True)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
