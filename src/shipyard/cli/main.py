"""The ``shipyard`` command (Typer + Rich): the terminal edge of the API.

    shipyard serve     control plane: API + orchestrator (starts or re-attaches to the agent)
    shipyard agent     data plane of one region: router + app supervisor (`agent stop` stops it)
    shipyard deploy    build and roll out a repository, with live stage progress
    shipyard status    one deployment, or a service (--watch: live, until the deployment ends)
    shipyard history   a service's deployments
    shipyard logs      what a service's replicas print (stdout, stderr), --follow
    shipyard rollback  put a service back on the revision before a deployment
    shipyard promote   let a Paused (canary gate) deployment go on
    shipyard abort     abort a deployment in flight: traffic back on stable at once
    shipyard scale     change a service's replica count without a deployment (cli/services.py)
    shipyard service   delete a service (cli/services.py)
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
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, cast

import typer
from rich import box
from rich.table import Table

from shipyard.cli import agent_ctl
from shipyard.cli.analysis_notes import analysis_note
from shipyard.cli.audit import audit_app
from shipyard.cli.build import build_app
from shipyard.cli.client import (
    DEFAULT_SERVER,
    ApiClient,
    is_local,
    resolve_token,
    source_defaults,
)
from shipyard.cli.keys import keys_app
from shipyard.cli.logs import logs_app
from shipyard.cli.safe import console, shown
from shipyard.cli.security import security_app
from shipyard.cli.services import services_app
from shipyard.cli.strategy_flags import strategy_from_flags
from shipyard.cli.token import token_app
from shipyard.domain import deployment_ids
from shipyard.domain.manifest import MANIFEST_NAME, parse_manifest
from shipyard.domain.models import DNS_LABEL
from shipyard.errors import InvalidInput, ManifestError, ShipyardError
from shipyard.private_files import ensure_private_dir
from shipyard.sandbox import Sandbox, SandboxPolicy, SandboxUnavailable, UidRange

app = typer.Typer(
    name="shipyard",
    help="Zero-downtime deployments: build, scan, sign, roll out, verify, roll back, audit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(audit_app, name="audit")
app.add_typer(token_app, name="token")
app.add_typer(keys_app, name="keys")
app.add_typer(security_app)  # scan, vulndb
app.add_typer(build_app)  # build
app.add_typer(services_app)  # scale, service delete
#: ``shipyard agent`` runs the agent; ``shipyard agent stop`` stops a running one.
agent_app = typer.Typer()
agent_app.command("stop")(agent_ctl.stop)
app.add_typer(agent_app, name="agent")
app.add_typer(logs_app)  # logs

out = console()
err = console(stderr=True)

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Server data directory.", envvar="SHIPYARD_DATA_DIR")
]
OptDataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Local server's data directory (mints a token).",
        envvar="SHIPYARD_DATA_DIR",
    ),
]
Server = Annotated[str, typer.Option("--server", envvar="SHIPYARD_SERVER", help="API base URL.")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="SHIPYARD_TOKEN", help="Bearer token.")
]
Format = Annotated[str, typer.Option("--format", help="table or json.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {shown(message, multiline=True)}")
    return typer.Exit(code)


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


# --- server processes ----------------------------------------------------------------------------


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise fail(f"--listen must be HOST:PORT, got {listen!r}")
    return host, int(port)


InsecureNoSandbox = Annotated[
    bool,
    typer.Option(
        "--insecure-no-sandbox",
        envvar="SHIPYARD_INSECURE_NO_SANDBOX",
        help="Run build commands and apps unsandboxed, as this server's own user, able to read "
        "its keys, tokens and database. Only for a trusted local experiment.",
    ),
]
SandboxUids = Annotated[
    str,
    typer.Option(
        "--sandbox-uids",
        envvar="SHIPYARD_SANDBOX_UIDS",
        help="FIRST-LAST: uids given to services' workloads, one per service (when root).",
    ),
]


def _sandbox(data_dir: Path, insecure: bool, uids: str) -> Sandbox:
    """The server's sandbox, checked once; exits 2 saying why when none can be made. Passes the
    choice on (environment) to the agent ``serve`` starts."""
    ensure_private_dir(data_dir)  # keys, tokens, the database: for this user only
    try:
        sandbox = Sandbox(
            SandboxPolicy(data_dir, uid_range=UidRange.parse(uids), insecure=insecure)
        )
        sandbox.check()
    except (SandboxUnavailable, InvalidInput) as exc:
        raise fail(exc.message) from exc
    os.environ["SHIPYARD_SANDBOX_UIDS"] = uids
    if insecure:
        os.environ["SHIPYARD_INSECURE_NO_SANDBOX"] = "1"
        err.print(
            "[bold red]WARNING: --insecure-no-sandbox: build commands and apps run as this "
            f"server's user (uid {os.geteuid()}) and can read {shown(data_dir)}: the signing and "
            "token "
            "keys, the agent token, the database and the audit trail. Never use this for code "
            "you do not trust.[/bold red]"
        )
    else:
        err.print(f"shipyard: {shown(sandbox.describe())}")
    return sandbox


@app.command()
def serve(
    data_dir: DataDir = Path(".shipyard"),
    listen: Annotated[str, typer.Option(help="HOST:PORT for the API.")] = "127.0.0.1:8080",
    region: Annotated[
        list[str] | None, typer.Option("--region", help="Regions to serve (repeat).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
    osv_db: Annotated[
        Path | None,
        typer.Option(
            "--osv-db",
            envvar="SHIPYARD_OSV_DB",
            help="Offline OSV database (dir or zip) for the security gate's scan.",
        ),
    ] = None,
    insecure_no_sandbox: InsecureNoSandbox = False,
    sandbox_uids: SandboxUids = "200000-299999",
    max_token_ttl_days: Annotated[
        int,
        typer.Option(
            "--max-token-ttl-days",
            envvar="SHIPYARD_MAX_TOKEN_TTL_DAYS",
            min=1,
            help="Longest token lifetime issued or accepted (`shipyard token create` obeys it).",
        ),
    ] = 90,
    four_eyes: Annotated[
        bool,
        typer.Option(
            "--four-eyes",
            envvar="SHIPYARD_FOUR_EYES",
            help="A paused deployment must be promoted by another subject than its deployer.",
        ),
    ] = False,
    witness: Annotated[
        list[str] | None,
        typer.Option(
            "--witness",
            envvar="SHIPYARD_WITNESS",
            help="Publish signed audit checkpoints here: a file outside the data directory or "
            "an http(s) URL (repeat for several).",
        ),
    ] = None,
    witness_history: Annotated[
        Path | None,
        typer.Option(help="With a file witness: also append every checkpoint to this file."),
    ] = None,
    checkpoint_interval: Annotated[
        float,
        typer.Option(min=1.0, help="Seconds between checkpoint publications to the witnesses."),
    ] = 60.0,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert", envvar="SHIPYARD_TLS_CERT", help="Serve HTTPS: PEM certificate (chain)."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key",
            envvar="SHIPYARD_TLS_KEY",
            help="Serve HTTPS: PEM private key (with --tls-cert).",
        ),
    ] = None,
    docs: Annotated[
        bool,
        typer.Option(
            "--docs/--no-docs", help="Serve /docs, /redoc and /openapi.json (assets are local)."
        ),
    ] = True,
    max_concurrent_builds: Annotated[
        int | None,
        typer.Option(min=1, help="Builds at once; more wait in a queue. Default: one per CPU."),
    ] = None,
    max_build_log_mb: Annotated[
        float, typer.Option(min=0.01, help="A build's log stops (with a notice) past this size.")
    ] = 10.0,
    build_log_retention_days: Annotated[
        float, typer.Option(min=0.0, help="Delete build logs older than this (0: keep).")
    ] = 30.0,
    build_log_retention_count: Annotated[
        int, typer.Option(min=0, help="Keep only the newest N build logs (0: no limit).")
    ] = 500,
    allow_source: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-source",
            help="Remote repositories deployers may name (fnmatch pattern, repeat), e.g. "
            "'ssh://git@github.com/myorg/*'. Default: 'https://*'. Giving any replaces it.",
        ),
    ] = None,
    source_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--source-root",
            help="Local repositories must be under one of these (repeat). Default: the current "
            "and the temporary directory. Never the data directory.",
        ),
    ] = None,
) -> None:
    """Run the control plane: the API and the orchestrator (starts or re-attaches to the agent)."""
    import uvicorn

    from shipyard.api import edge
    from shipyard.api.app import create_app
    from shipyard.logs import configure_logging
    from shipyard.settings import Settings

    host, port = _parse_listen(listen)
    try:
        edge.check_tls(tls_cert, tls_key)
    except InvalidInput as exc:
        raise fail(exc.message) from exc
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise fail(f"cannot listen on {listen}: {exc.strerror}; pick another --listen") from exc
    configure_logging(log_level.upper())
    sandbox = _sandbox(data_dir.resolve(), insecure_no_sandbox, sandbox_uids)
    if osv_db is not None and not osv_db.exists():
        raise fail(f"--osv-db {osv_db} does not exist; pass an OSV database directory or zip")
    settings = Settings(
        data_dir=data_dir.resolve(),
        regions=tuple(region or ["local"]),
        osv_db=osv_db.resolve() if osv_db else None,
        sandbox=sandbox.policy,
        max_token_ttl_seconds=max_token_ttl_days * 24 * 3600,
        four_eyes=four_eyes,
        witnesses=tuple(witness or ()),
        witness_history=witness_history,
        checkpoint_interval_seconds=checkpoint_interval,
        tls_cert=tls_cert.resolve() if tls_cert else None,
        tls_key=tls_key.resolve() if tls_key else None,
        docs=docs,
        **_build_settings(
            max_concurrent_builds,
            max_build_log_mb,
            build_log_retention_days,
            build_log_retention_count,
            allow_source,
            source_root,
        ),
    )
    _check_witnesses(settings.witnesses, settings.data_dir, settings.witness_history)
    if osv_db is None:
        err.print(
            "[yellow]warning:[/yellow] no --osv-db: artifacts get an SBOM and are signed, "
            "but not scanned for vulnerabilities"
        )
    scheme = "https" if tls_cert else "http"
    err.print(
        f"shipyard serve: API on {scheme}://{shown(host)}:{port}, "
        f"data in {shown(settings.data_dir)}"
    )
    descriptors = edge.raise_descriptor_limit()
    config = edge.server_config(
        create_app(settings), settings, host, port, descriptor_limit=descriptors
    )
    config.loop = "uvloop"
    uvicorn.Server(config).run()


def _build_settings(
    max_concurrent_builds: int | None,
    max_build_log_mb: float,
    retention_days: float,
    retention_count: int,
    allow_source: list[str] | None,
    source_root: list[Path] | None,
) -> dict[str, Any]:
    """``Settings`` fields for builds and their sources from ``serve``'s flags (0: no limit)."""
    fields: dict[str, Any] = {
        "max_build_log_bytes": max(4096, int(max_build_log_mb * 2**20)),
        "build_log_retention_days": retention_days or None,
        "build_log_retention_count": retention_count or None,
    }
    if max_concurrent_builds is not None:
        fields["max_concurrent_builds"] = max_concurrent_builds
    if allow_source:
        fields["allowed_sources"] = tuple(allow_source)
    if source_root:
        for root in source_root:
            if not root.is_dir():
                raise fail(f"--source-root {root} is not a directory")
        fields["source_roots"] = tuple(r.resolve() for r in source_root)
    return fields


def _check_witnesses(witnesses: tuple[str, ...], data_dir: Path, history: Path | None) -> None:
    """Refuse a bad --witness before anything starts; warn when there is none."""
    from shipyard.audit.publishing import parse_witness

    if history is not None and not witnesses:
        raise fail("--witness-history needs a --witness")
    try:
        for target in witnesses:
            parse_witness(target, data_dir, history)
    except InvalidInput as exc:
        raise fail(exc.message) from exc
    if not witnesses:
        err.print(
            "[yellow]warning:[/yellow] no --witness: audit checkpoints are not published, so "
            "`shipyard audit verify` can only prove the trail's internal consistency"
        )


@agent_app.callback(invoke_without_command=True)
def agent(
    ctx: typer.Context,
    data_dir: DataDir = Path(".shipyard"),
    region: Annotated[str, typer.Option(help="Region this agent serves.")] = "local",
    detach: Annotated[
        bool, typer.Option(help="Fork into its own session and return at once (used by serve).")
    ] = False,
    insecure_no_sandbox: InsecureNoSandbox = False,
    sandbox_uids: SandboxUids = "200000-299999",
    trusted_key: Annotated[
        Path | None,
        typer.Option(
            help="The control plane's PUBLIC signing key (PEM): the agent starts only artifacts "
            "signed with it. Default: DATA_DIR/keys/signing.pub."
        ),
    ] = None,
    router_head_timeout: Annotated[
        float, typer.Option(help="Seconds a request head may take to arrive whole (then 408).")
    ] = 10.0,
    router_keepalive_timeout: Annotated[
        float, typer.Option(help="Seconds an idle keep-alive connection waits for a request.")
    ] = 60.0,
    router_body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may make no progress (then 408).")
    ] = 10.0,
    router_response_timeout: Annotated[
        float, typer.Option(help="Seconds an app may take to start answering (then 504).")
    ] = 60.0,
    router_max_connections: Annotated[
        int, typer.Option(help="Client connections per service (past it: 503 at once).")
    ] = 4096,
    router_max_connections_total: Annotated[
        int, typer.Option(help="Client connections across all services of this agent.")
    ] = 65536,
    replica_log_mb: Annotated[
        float, typer.Option(help="Size of one replica log file before it rotates (MiB).")
    ] = 10.0,
    replica_log_files: Annotated[
        int, typer.Option(help="Log files kept per replica, the one being written included.")
    ] = 3,
    replica_log_revisions: Annotated[
        int, typer.Option(help="Revisions per service whose stopped replicas' logs are kept.")
    ] = 5,
    http_listen: Annotated[
        str | None,
        typer.Option(
            help="ADDR:PORT of a shared HTTP listener routing by \\[service] hosts, e.g. "
            "0.0.0.0:80 on a public host; remembered for the agent's next start ('off' forgets "
            "both). Default: the remembered ones, else none (each service on its own port)."
        ),
    ] = None,
    https_listen: Annotated[
        str | None,
        typer.Option(help="ADDR:PORT of a shared HTTPS listener (SNI), e.g. 0.0.0.0:443."),
    ] = None,
    tls_cert_dir: Annotated[
        Path | None,
        typer.Option(
            help="Certificates for --https-listen: HOST.pem (chain) and HOST.key per host name, "
            "reloaded on change. Default: DATA_DIR/agents/REGION/certs."
        ),
    ] = None,
    docker_host: Annotated[
        str | None,
        typer.Option(
            envvar="DOCKER_HOST",
            help="Docker Engine that image revisions run on, e.g. unix:///run/docker.sock. "
            "Default: the docker SDK's (the local socket).",
        ),
    ] = None,
    container_network: Annotated[
        str,
        typer.Option(
            help="auto|host|publish: containers on the host's network with their port in PORT, "
            "or their port published on 127.0.0.1; auto: host when the engine has no bridge.",
        ),
    ] = "auto",
) -> None:
    """Run the data plane of one region: the traffic router and the app supervisor.

    The router limits are every service's defaults; a service's own are set through the agent
    API (``PUT /v1/services/NAME/limits``). ``shipyard agent stop`` stops a running one."""
    if ctx.invoked_subcommand is not None:
        return  # `shipyard agent stop`
    import uvloop

    from shipyard.agent.server import run_agent
    from shipyard.logs import configure_logging
    from shipyard.routing.limits import RouterLimits

    try:  # refused before anything starts
        limits = RouterLimits(
            head_timeout=router_head_timeout,
            keepalive_timeout=router_keepalive_timeout,
            body_timeout=router_body_timeout,
            response_timeout=router_response_timeout,
            max_connections=router_max_connections,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if router_max_connections_total <= 0:
        raise typer.BadParameter("--router-max-connections-total must be positive")
    from shipyard.agent.replica_logs import LogLimits

    try:
        log_limits = LogLimits(
            int(replica_log_mb * 1024 * 1024), replica_log_files, replica_log_revisions
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    from shipyard.cli.listen import parse_listen

    if container_network not in ("auto", "host", "publish"):
        raise typer.BadParameter("--container-network must be auto, host or publish")
    network = cast(Literal["auto", "host", "publish"], container_network)
    http_addr = parse_listen("--http-listen", http_listen)
    https_addr = parse_listen("--https-listen", https_listen)
    entry_given = http_listen is not None or https_listen is not None
    if detach:  # before any event loop or thread exists: fork is safe here
        if os.fork() > 0:
            os._exit(0)
        os.setsid()  # its own session: it outlives the control plane and its terminal
    configure_logging("INFO")
    sandbox = _sandbox(data_dir.resolve(), insecure_no_sandbox, sandbox_uids)
    key = trusted_key.resolve() if trusted_key else None
    uvloop.run(
        run_agent(
            data_dir.resolve(),
            region,
            trusted_key=key,
            sandbox=sandbox,
            router_limits=limits,
            max_connections=router_max_connections_total,
            log_limits=log_limits,
            http_listen=http_addr,
            https_listen=https_addr,
            tls_cert_dir=tls_cert_dir.resolve() if tls_cert_dir else None,
            entry_given=entry_given,
            docker_host=docker_host or None,
            container_network=network,
        )
    )


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
    region: str = "local",
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
    """Deploy a commit (blue-green, canary or rolling); exits 0 only if it ends Success."""
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
    body: dict[str, Any] = {
        "source": {"repository": repo, "branch": branch, "commit": commit},
        "target": {"service_name": service, "region": region},
        "strategy": strategy_body,
    }
    if rebuild:  # only when asked: servers that predate the field accept the body unchanged
        body["rebuild"] = True
    client = _client(server, token, data_dir, "deployment:create", "deployment:read")
    accepted = _check(client.request("POST", "/api/v1/deploy", json=body))
    dep_id = accepted["deployment_id"]
    if format != "json":
        err.print(
            f"deployment [bold]{shown(dep_id)}[/bold]: {shown(service)} {shown(commit[:10])} "
            f"({shown(branch)}) -> {shown(region)}"
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
        if doc["status"] in ("Success", "Failed", "RolledBack"):
            if not quiet:
                _print_outcome(doc)
            return dict(doc)
        time.sleep(0.2)


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
        for st in doc["stages"]:
            out.print("  " + _stage_line(st))
        if doc.get("error"):
            e = doc["error"]
            out.print(
                f"  [red]{shown(e.get('type'))}[/red]: {shown(e.get('message'), multiline=True)}"
            )
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


@app.command()
def promote(
    deployment_id: Annotated[
        str, typer.Argument(help="A Paused deployment (its id or a unique prefix).")
    ],
    wait: bool = True,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Let a Paused deployment (a canary stage's gate, or an analysis waiting for a human) go on."""
    client = _client(server, token, data_dir, "deployment:create", "deployment:read")
    before = _current(client, deployment_id, wait)
    accepted = _check(client.request("POST", f"/api/v1/deployments/{deployment_id}/promote"))
    deployment_id = accepted["deployment_id"]  # the full id of a prefix
    err.print(f"promoted [bold]{shown(deployment_id)}[/bold]")
    _follow_and_exit(client, deployment_id, wait, success="Success", since=before)


@app.command()
def abort(
    deployment_id: Annotated[
        str, typer.Argument(help="A deployment in flight (its id or a unique prefix).")
    ],
    wait: bool = True,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Abort a deployment in flight: the candidate's weight goes to 0 now, then it rolls back."""
    client = _client(server, token, data_dir, "deployment:rollback", "deployment:read")
    before = _current(client, deployment_id, wait)
    accepted = _check(client.request("POST", f"/api/v1/deployments/{deployment_id}/abort"))
    deployment_id = accepted["deployment_id"]  # the full id of a prefix
    err.print(f"aborting [bold]{shown(deployment_id)}[/bold]")
    _follow_and_exit(client, deployment_id, wait, success="RolledBack", since=before)


@app.command()
def demo(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Default: a fresh temp dir.")
    ] = None,
    port: Annotated[int, typer.Option(help="API port (0 = any free one).")] = 0,
) -> None:
    """v1 -> v2 blue-green and v3 canary under load (0 failed), broken v4 rolled back, audit."""
    from shipyard.cli.demo import run_demo

    raise typer.Exit(run_demo(data_dir, port, err))


def main() -> None:
    try:
        app()
    except ShipyardError as exc:
        err.print(f"[red]error:[/red] {shown(exc.message, multiline=True)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
