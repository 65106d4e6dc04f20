"""What the ``shipyard`` commands share: the stderr console, ``fail`` (a message, then exit 2),
the ``--data-dir``, ``--shared-dir`` and ``--database`` options (``open_store``), and the server
processes' sandbox and listen-address checks (used by ``cli.main`` and ``cli.daemons``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import Engine

from shipyard.cli.safe import console, shown
from shipyard.errors import InvalidInput, TransientError
from shipyard.private_files import ensure_private_dir
from shipyard.sandbox import Sandbox, SandboxPolicy, SandboxUnavailable, UidRange
from shipyard.store.engine import open_engine

err = console(stderr=True)

#: The API clients' options (``deploy``, ``secret``, ``notifications``, ``service``, ...).
Server = Annotated[str, typer.Option("--server", envvar="SHIPYARD_SERVER", help="API base URL.")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="SHIPYARD_TOKEN", help="Bearer token.")
]
OptDataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Local server's data directory (mints a token).",
        envvar="SHIPYARD_DATA_DIR",
    ),
]

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Server data directory.", envvar="SHIPYARD_DATA_DIR")
]
#: The directory the control-plane replicas share (keys/, fleet/, artifacts/, build logs);
#: None: the data directory (one control plane).
SharedDir = Annotated[
    Path | None,
    typer.Option(
        "--shared-dir",
        envvar="SHIPYARD_SHARED_DIR",
        help="Directory every control-plane replica shares (keys, fleet CA, artifacts, build "
        "logs), e.g. on NFS. Default: the data directory.",
    ),
]

#: The store every command that reads it takes (``serve``, ``token``, ``audit``, ``region``,
#: ``db``): without it, SQLite in the data directory.
Database = Annotated[
    str | None,
    typer.Option(
        "--database",
        envvar="SHIPYARD_DATABASE",
        show_default=False,
        help="The store: a postgresql://USER:PASSWORD@HOST:PORT/NAME URL that control-plane "
        "replicas share. Default: SQLite in the data directory.",
    ),
]


def open_store(database: str | None, data_dir: Path) -> Engine:
    """``store.engine.open_engine`` for a command: exit 2 saying why when it cannot."""
    try:
        return open_engine(database, data_dir)
    except (InvalidInput, TransientError) as exc:
        raise fail(exc.message) from exc


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {shown(message, multiline=True)}")
    return typer.Exit(code)


def api_listen(listen: str) -> tuple[str, int]:
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


def make_sandbox(
    data_dir: Path, insecure: bool, uids: str, shared_dir: Path | None = None
) -> Sandbox:
    """The server's sandbox, hiding the data and the shared directory, checked once; exits 2
    saying why when none can be made. Passes the choice on (environment) to the agent ``serve``
    starts."""
    ensure_private_dir(data_dir)  # keys, tokens, the database: for this user only
    hide: tuple[Path, ...] = ()
    if shared_dir is not None:
        hide = (ensure_private_dir(shared_dir),)
    try:
        sandbox = Sandbox(
            SandboxPolicy(data_dir, uid_range=UidRange.parse(uids), insecure=insecure, hide=hide)
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
