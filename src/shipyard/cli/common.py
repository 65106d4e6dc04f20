"""What the ``shipyard`` commands share: the stderr console, ``fail`` (a message, then exit 2),
the ``--data-dir`` option, and the server processes' sandbox and listen-address checks (used by
``cli.main`` and ``cli.daemons``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from shipyard.cli.safe import console, shown
from shipyard.errors import InvalidInput
from shipyard.private_files import ensure_private_dir
from shipyard.sandbox import Sandbox, SandboxPolicy, SandboxUnavailable, UidRange

err = console(stderr=True)

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Server data directory.", envvar="SHIPYARD_DATA_DIR")
]


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


def make_sandbox(data_dir: Path, insecure: bool, uids: str) -> Sandbox:
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
