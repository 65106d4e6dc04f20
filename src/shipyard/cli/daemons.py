"""The long-running commands: ``shipyard serve`` (the control plane) and ``shipyard agent`` (a
region's data plane). Registered on the ``shipyard`` app by ``cli.main``; their start-up checks
refuse bad flags before anything starts (exit 2)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer

from shipyard.cli.common import (
    Database,
    DataDir,
    InsecureNoSandbox,
    SandboxUids,
    SharedDir,
    api_listen,
    err,
    fail,
    make_sandbox,
)
from shipyard.cli.registry_flag import RegistryFlag
from shipyard.cli.safe import shown
from shipyard.errors import InvalidInput
from shipyard.notify.config import ServerConfig, load_server_config
from shipyard.private_files import ensure_private_dir

#: ``--replica-id``: a name the leases, the audit trail and ``driver`` show as it is.
REPLICA_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def serve(
    data_dir: DataDir = Path(".shipyard"),
    shared_dir: SharedDir = None,
    database: Database = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT for the API.")] = "127.0.0.1:8080",
    region: Annotated[
        list[str] | None,
        typer.Option("--region", help="Regions of the local agent to serve (repeat)."),
    ] = None,
    local_agent: Annotated[
        bool | None,
        typer.Option(
            "--local-agent/--no-local-agent",
            help="Run a local agent per --region. Default: yes with SQLite, no with a "
            "PostgreSQL --database (replicas serve joined regions only).",
        ),
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
    registry: RegistryFlag = None,
    fleet_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of the fleet listener remote agents join and renew through (mTLS; "
            "off by default). `shipyard region add` prints the join command."
        ),
    ] = None,
    fleet_cert_ttl: Annotated[
        float, typer.Option(min=1.0, help="Seconds a joined agent's certificate lives.")
    ] = 3600.0,
    replica_id: Annotated[
        str | None,
        typer.Option(
            "--replica-id",
            envvar="SHIPYARD_REPLICA_ID",
            help="This replica's name in the leases (several replicas on one database). "
            "Default: HOSTNAME:PORT.",
        ),
    ] = None,
    lease_seconds: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="A replica that does not renew its leases for this long loses its deployments "
            "to another replica.",
        ),
    ] = 10.0,
    server_config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="SHIPYARD_SERVER_CONFIG",
            help="A server config file (TOML): notifications.sinks tables (webhook or slack; "
            "secret_env / url_env name variables of serve's environment). Its sinks replace "
            "the previous file's at every start.",
        ),
    ] = None,
) -> None:
    """Run the control plane: the API and the orchestrator (starts or re-attaches to the agent)."""
    import uvicorn

    from shipyard import tracing
    from shipyard.api import edge
    from shipyard.api.app import create_app
    from shipyard.logs import configure_logging
    from shipyard.settings import Settings

    host, port = api_listen(listen)
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
    fleet = _fleet_listen(fleet_listen)
    regions = _local_regions(region, local_agent, database)
    store = _store_url(database, data_dir)
    replica = replica_id if replica_id is not None else f"{socket.gethostname()}:{port}"
    if not REPLICA_ID.fullmatch(replica):
        raise fail(
            f"--replica-id {shown(replica)} is not a replica name: 1-128 letters, digits and "
            "'.', '_', ':', '@', '-'"
        )
    try:  # the OTEL_* variables: refused now, with what to set, rather than at startup
        traces_to = tracing.check(os.environ)
    except InvalidInput as exc:
        raise fail(exc.message) from exc
    configure_logging(log_level.upper())
    data, shared = _directories(data_dir, shared_dir)
    sandbox = make_sandbox(data, insecure_no_sandbox, sandbox_uids, shared)
    if osv_db is not None and not osv_db.exists():
        raise fail(f"--osv-db {osv_db} does not exist; pass an OSV database directory or zip")
    loaded_config = _server_config(server_config)
    settings = Settings(
        data_dir=data,
        shared_dir=shared,
        database=database,
        regions=regions,
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
        image_registry=registry,
        fleet_listen=fleet,
        fleet_cert_ttl_seconds=fleet_cert_ttl,
        replica_id=replica,
        lease_seconds=lease_seconds,
        server_config=loaded_config,
        **_build_settings(
            max_concurrent_builds,
            max_build_log_mb,
            build_log_retention_days,
            build_log_retention_count,
            allow_source,
            source_root,
        ),
    )
    _check_witnesses(
        settings.witnesses, settings.data_dir, settings.witness_history, settings.shared_dir
    )
    if osv_db is None:
        err.print(
            "[yellow]warning:[/yellow] no --osv-db: artifacts get an SBOM and are signed, "
            "but not scanned for vulnerabilities"
        )
    scheme = "https" if tls_cert else "http"
    err.print(
        f"shipyard serve: API on {scheme}://{shown(host)}:{port}, "
        f"data in {shown(settings.data_dir)}, store {shown(store)}, replica {shown(replica)}"
        + (f", shared in {shown(shared)}" if shared != data else "")
        + ("" if regions else ", no local agent")
        + (f", traces {traces_to}" if traces_to else "")
    )
    descriptors = edge.raise_descriptor_limit()
    config = edge.server_config(
        create_app(settings), settings, host, port, descriptor_limit=descriptors
    )
    config.loop = "uvloop"
    uvicorn.Server(config).run()


def _server_config(config: Path | None) -> ServerConfig | None:
    """``--config`` (None without a file); a bad file exits 2 saying what is wrong."""
    if config is None:
        return None
    try:
        return load_server_config(config)
    except InvalidInput as exc:
        raise fail(exc.message) from exc


def _directories(data_dir: Path, shared_dir: Path | None) -> tuple[Path, Path]:
    """(data, shared) resolved; the shared directory made private (0700, it holds the keys).
    A shared one is also named to the local agent ``serve`` starts (environment): it trusts
    the signing key there and hides the directory from workloads."""
    data = data_dir.resolve()
    if shared_dir is None or shared_dir.resolve() == data:
        return data, data
    shared = shared_dir.resolve()
    if shared.is_relative_to(data) or data.is_relative_to(shared):
        raise fail(
            f"--shared-dir {shared} and --data-dir {data} must not contain each other: the "
            "data directory is this replica's own, the shared one every replica's"
        )
    try:
        ensure_private_dir(shared)
    except OSError as exc:
        raise fail(f"--shared-dir {shared}: {exc.strerror}; mount it or pick another") from exc
    os.environ["SHIPYARD_SHARED_DIR"] = str(shared)
    return data, shared


def _local_regions(
    region: list[str] | None, local_agent: bool | None, database: str | None = None
) -> tuple[str, ...]:
    """The regions ``serve``'s local agents serve: ``--region`` (default ``local``), or none
    with ``--no-local-agent`` -- the default with a PostgreSQL ``database``, where several
    replicas run and a replica's own agent would die with it."""
    if local_agent is None:
        local_agent = not (database or "").startswith("postgresql")
    if not local_agent:
        if region:
            raise fail(
                "--region names the local agent's regions, and there is none (--no-local-agent, "
                "the default with PostgreSQL): add remote regions with `shipyard region add`, or "
                "pass --local-agent"
            )
        return ()
    return tuple(region or ["local"])


def _store_url(database: str | None, data_dir: Path) -> str:
    """``--database`` checked before anything starts, as it may be shown (password masked)."""
    from shipyard.store.engine import database_url, shown_url

    try:
        return shown_url(database_url(database, data_dir.resolve()))
    except InvalidInput as exc:
        raise fail(exc.message) from exc


def _fleet_listen(value: str | None) -> tuple[str, int] | None:
    """``--fleet-listen`` parsed and its port checked free, before anything starts."""
    if value is None:
        return None
    host, port = api_listen(value)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise fail(
                f"cannot listen on {value}: {exc.strerror}; pick another --fleet-listen"
            ) from exc
    return host, port


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


def _check_witnesses(
    witnesses: tuple[str, ...], data_dir: Path, history: Path | None, shared_dir: Path | None = None
) -> None:
    """Refuse a bad --witness (one inside the data or the shared directory too) before anything
    starts; warn when there is none."""
    from shipyard.audit.publishing import parse_witness

    if history is not None and not witnesses:
        raise fail("--witness-history needs a --witness")
    try:
        for target in witnesses:
            for directory in dict.fromkeys([data_dir, shared_dir or data_dir]):
                parse_witness(target, directory, history)
    except InvalidInput as exc:
        raise fail(exc.message) from exc
    if not witnesses:
        err.print(
            "[yellow]warning:[/yellow] no --witness: audit checkpoints are not published, so "
            "`shipyard audit verify` can only prove the trail's internal consistency"
        )


def agent(
    ctx: typer.Context,
    data_dir: DataDir = Path(".shipyard"),
    shared_dir: Annotated[
        Path | None,
        typer.Option(
            "--shared-dir",
            envvar="SHIPYARD_SHARED_DIR",
            help="The local agent of `serve --shared-dir`: trust the signing key there "
            "(keys/signing.pub) and hide it from workloads (serve passes it on).",
        ),
    ] = None,
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
    join: Annotated[
        list[str] | None,
        typer.Option(
            help="Join the control plane's fleet listener at this https:// URL; repeat once per "
            "control-plane replica (renewals and artifact fetches fail over between them)."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="SHIPYARD_JOIN_TOKEN",
            help="The join token `shipyard region add` printed (or SHIPYARD_JOIN_TOKEN, kept "
            "out of the process list).",
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a joined agent's API (mTLS); its services bind HOST."),
    ] = None,
    port_range: Annotated[
        str | None, typer.Option(help="LOW-HIGH: ports a joined agent's services get.")
    ] = None,
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
    joined = _joined_agent(data_dir.resolve(), join, token, listen, port_range, ctx)
    if detach:  # before any event loop or thread exists: fork is safe here
        if os.fork() > 0:
            os._exit(0)
        os.setsid()  # its own session: it outlives the control plane and its terminal
    configure_logging("INFO")
    shared = shared_dir.resolve() if shared_dir is not None else None
    sandbox = make_sandbox(data_dir.resolve(), insecure_no_sandbox, sandbox_uids, shared)
    key = trusted_key.resolve() if trusted_key else None
    if key is None and joined is None and shared is not None:
        from shipyard.agent.server import default_trusted_key

        key = default_trusted_key(shared)  # the control plane's key, shared by its replicas
    fleet: dict[str, Any] = {}
    if joined is not None:  # a remote agent: mTLS API, services on its host, renewal
        from shipyard.agent.joining import Renewer, artifact_fetcher
        from shipyard.agent.server import agent_dir

        member, sock, server_context = joined
        region = member.region
        # Directory artifacts come from the control plane by digest, never from a path.
        fetcher, client_context = artifact_fetcher(
            member, agent_dir(data_dir.resolve(), region) / "artifacts"
        )
        fleet = {
            "listen_host": member.host,
            "port_range": member.port_range,
            "api_socket": sock,
            "api_ssl": server_context,
            "background": Renewer(member, server_context, [client_context]).run,
            "fetcher": fetcher,
        }
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
            shared_dir=shared if joined is None else None,
            **fleet,
        )
    )


def _joined_agent(
    data_dir: Path,
    join: list[str] | None,
    token: str | None,
    listen: str | None,
    port_range: str | None,
    ctx: typer.Context,
) -> Any:
    """(membership, API socket, server SSL context) of a joined agent (agent/joining.py): joins
    now with ``--join``, or comes back with the identity stored in ``data_dir``; None for the
    local agent. Exit 2 with the reason when joining is refused."""
    from shipyard.agent import joining

    if not join and joining.Membership.load(data_dir) is None:
        if token or listen or port_range:
            raise typer.BadParameter("--token, --listen and --port-range go with --join URL")
        return None
    # --region only checks the token's region when given; the default "local" is no claim.
    source = ctx.get_parameter_source("region")
    named = source is not None and source.name != "DEFAULT"
    try:
        return joining.prepare(
            data_dir,
            join_urls=join or (),
            token=token,
            listen=api_listen(listen) if listen else None,
            port_range=joining.parse_port_range(port_range),
            region=ctx.params.get("region") if named else None,
        )
    except InvalidInput as exc:
        raise fail(exc.message) from exc
