"""``shipyard token``: issue API bearer tokens from a terminal.

The lead's main CLI mounts ``token_app`` as ``shipyard token``. ``create`` signs with the data
directory's key (api/auth.py ``TokenAuthority.from_data_dir``, created on first use), prints a
human summary on stderr and the token alone as the last line of stdout, so
``TOKEN=$(shipyard token create ...)`` works. Exit 2 for a missing data directory or bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shipyard.api.auth import PERMISSIONS, TokenAuthority
from shipyard.errors import InvalidInput

token_app = typer.Typer(name="token", help="Issue API bearer tokens.", no_args_is_help=True)


@token_app.callback()
def _group() -> None:
    """Issue API bearer tokens."""


@token_app.command()
def create(
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Shipyard's data directory (holds keys/jwt.key).")
    ],
    subject: Annotated[str, typer.Option("--subject", help="Who the token is for.")],
    permission: Annotated[
        list[str],
        typer.Option(
            "--permission",
            help=f"Repeat for each permission: {', '.join(sorted(PERMISSIONS))}.",
        ),
    ],
    ttl_seconds: Annotated[
        int, typer.Option("--ttl-seconds", help="How long the token is valid.")
    ] = 12 * 3600,
) -> None:
    """Create a token for SUBJECT carrying the given permissions."""
    if not data_dir.is_dir():
        typer.echo(f"error: data directory {data_dir} does not exist", err=True)
        raise typer.Exit(2)
    unknown = sorted(set(permission) - PERMISSIONS)
    if unknown:
        typer.echo(
            f"error: unknown permission(s): {', '.join(unknown)}; valid permissions: "
            f"{', '.join(sorted(PERMISSIONS))}",
            err=True,
        )
        raise typer.Exit(2)
    try:
        authority = TokenAuthority.from_data_dir(data_dir)
        token = authority.issue(subject, permission, ttl_seconds=ttl_seconds)
        claims = authority.verify(token)
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(
        f"token for {claims.subject} with {', '.join(sorted(claims.permissions))}, "
        f"expires {claims.expires_at.isoformat()}:",
        err=True,
    )
    typer.echo(token)
