"""``shipyard token``: issue, list and revoke API bearer tokens from a terminal.

The lead's main CLI mounts ``token_app`` as ``shipyard token``. Every command works on the data
directory (``--data-dir`` or ``SHIPYARD_DATA_DIR``) through ``api.tokens.TokenService``: its
signing key (created by ``serve`` at its first start; in ``--shared-dir`` when the replicas
share one), its token registry and its audit trail
(``token.created`` / ``token.revoked``, by ``local:<os user>``). ``create`` refuses a directory
no server has used (no ``keys/jwt.key``: a key minted there would sign tokens no server
accepts), prints a human summary on stderr and the token alone as the last line of stdout, so
``TOKEN=$(shipyard token create ...)`` works; it refuses a lifetime longer than the limit the
server last started with (``shipyard serve --max-token-ttl-days``, 90 days by default).
``revoke`` takes effect on the next request to every server sharing the store. ``issue_local``
is the same issuing for the CLI's own short-lived tokens (cli/client.py, cli/demo.py). Exit 2
for a missing data directory or bad input, 1 for an unknown token id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from shipyard.api import permissions
from shipyard.api.tokens import TokenService
from shipyard.cli.common import Database, SharedDir
from shipyard.cli.safe import console, neutralised, shown
from shipyard.errors import InvalidInput, NotFound, TransientError

token_app = typer.Typer(
    name="token", help="Issue, list and revoke API bearer tokens.", no_args_is_help=True
)

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="SHIPYARD_DATA_DIR",
        help="Shipyard's data directory (holds keys/jwt.key and shipyard.db).",
    ),
]
#: What a server's data directory holds from its first start: the key tokens are signed with.
TOKEN_KEY = Path("keys") / "jwt.key"


@token_app.callback()
def _group() -> None:
    """Issue, list and revoke API bearer tokens."""


def local_actor() -> str:
    """Who runs the CLI, as the audit trail names them: ``local:<os user>``."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"local:uid-{os.getuid()}"


def require_server_state(data_dir: Path, shared_dir: Path | None = None) -> None:
    """InvalidInput unless ``data_dir`` is a server's data directory and ``shared_dir`` (default
    ``data_dir``) holds its keys (``shipyard serve`` creates ``keys/jwt.key`` at its first
    start). Signing with a key made here instead would give a token every running server
    refuses, and leave a second key for the next server to adopt."""
    if not data_dir.is_dir():
        raise InvalidInput(f"data directory {data_dir} does not exist")
    keys = shared_dir or data_dir
    if not (keys / TOKEN_KEY).is_file():
        flag = "--shared-dir" if shared_dir is not None else "--data-dir"
        raise InvalidInput(
            f"{keys.resolve()} holds no Shipyard server state (no {TOKEN_KEY}): a token "
            "signed there would be refused by your server. Point at the directory your server "
            "was started with (`shipyard serve --data-dir DIR`, default .shipyard) with "
            "--data-dir DIR or SHIPYARD_DATA_DIR=DIR (and, for replicas sharing keys, "
            "--shared-dir SHARED or SHIPYARD_SHARED_DIR=SHARED), or run `shipyard serve "
            f"{flag} {keys}` first to create it"
        )


def issue_local(
    data_dir: Path,
    subject: str,
    permission: Sequence[str],
    *,
    ttl_seconds: int = 3600,
    shared_dir: Path | None = None,
    database: str | None = None,
) -> str:
    """A recorded, audited token from the server's key (in ``shared_dir``, default
    ``data_dir``; what ``create`` does, for the CLI's own use), recorded in ``database``
    (default ``SHIPYARD_DATABASE``, else SQLite in ``data_dir``); InvalidInput for bad input or
    a directory no server has used."""
    require_server_state(data_dir, shared_dir)
    database = database or os.environ.get("SHIPYARD_DATABASE") or None
    service = TokenService.for_data_dir(data_dir, database=database, shared_dir=shared_dir)
    try:
        issued = asyncio.run(
            service.issue(subject, list(permission), ttl_seconds, issued_by=local_actor())
        )
    finally:
        service.close()
    return issued.token


def _service(data_dir: Path, shared_dir: Path | None, database: str | None) -> TokenService:
    try:
        return TokenService.for_data_dir(data_dir, database=database, shared_dir=shared_dir)
    except (InvalidInput, TransientError) as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc


@token_app.command()
def create(
    data_dir: DataDir,
    subject: Annotated[str, typer.Option("--subject", help="Who the token is for.")],
    permission: Annotated[
        list[str],
        typer.Option(
            "--permission", help=f"Repeat for each permission: {permissions.help_text()}."
        ),
    ],
    ttl_seconds: Annotated[
        int,
        typer.Option(
            "--ttl-seconds",
            help="How long the token is valid; at most the server's --max-token-ttl-days "
            "(90 days by default).",
        ),
    ] = 12 * 3600,
    shared_dir: SharedDir = None,
    database: Database = None,
) -> None:
    """Create a token for SUBJECT carrying the given permissions (signed with the key of the
    server whose data directory this is; refused for a directory no server has used)."""
    try:
        permissions.parse_all(permission)
        require_server_state(data_dir, shared_dir)
    except InvalidInput as exc:  # before anything is created in the data directory
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    service = _service(data_dir, shared_dir, database)
    try:
        issued = asyncio.run(
            service.issue(subject, permission, ttl_seconds, issued_by=local_actor())
        )
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    finally:
        service.close()
    claims = issued.claims
    typer.echo(
        f"token {claims.token_id} for {neutralised(claims.subject)} with "
        f"{', '.join(sorted(claims.permissions))}, expires {claims.expires_at.isoformat()}:",
        err=True,
    )
    typer.echo(issued.token)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@token_app.command("list")
def list_tokens(data_dir: DataDir, shared_dir: SharedDir = None, database: Database = None) -> None:
    """List every token issued (ids, subjects, permissions; never the tokens)."""
    if not data_dir.is_dir():
        typer.echo(f"error: data directory {data_dir} does not exist", err=True)
        raise typer.Exit(2)
    service = _service(data_dir, shared_dir, database)
    try:
        rows = asyncio.run(service.list())
    finally:
        service.close()
    table = Table(box=box.SIMPLE)
    for column in ("id", "subject", "permissions", "expires", "revoked"):
        table.add_column(column, overflow="fold")
    for row in rows:
        revoked = f"{_when(row.revoked_at)} by {row.revoked_by}" if row.revoked else "-"
        perms = " ".join(row.permissions)
        table.add_row(
            shown(row.id), shown(row.subject), shown(perms), _when(row.expires_at), shown(revoked)
        )
    console(width=200).print(table)


@token_app.command()
def revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (`shipyard token list`).")],
    data_dir: DataDir,
    shared_dir: SharedDir = None,
    database: Database = None,
) -> None:
    """Revoke a token: every server sharing this data directory refuses it from now on."""
    if not data_dir.is_dir():
        typer.echo(f"error: data directory {data_dir} does not exist", err=True)
        raise typer.Exit(2)
    service = _service(data_dir, shared_dir, database)
    try:
        row, changed = asyncio.run(service.revoke(token_id, by=local_actor()))
    except NotFound as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    finally:
        service.close()
    if not changed:
        typer.echo(
            f"token {row.id} ({neutralised(row.subject)}) was already revoked at "
            f"{_when(row.revoked_at)} by {neutralised(row.revoked_by)}"
        )
    else:
        typer.echo(f"revoked token {row.id} ({neutralised(row.subject)})")
