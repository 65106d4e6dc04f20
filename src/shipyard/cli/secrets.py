"""``shipyard secret``: a service's app secrets, through the API (api/secrets.py). Mounted by
cli/main.py (``app.add_typer(secret_app, name="secret")``).

    shipyard secret set SERVICE NAME     the value from stdin (hidden prompt on a terminal)
    shipyard secret list SERVICE         names, versions, who set them and when; never values
    shipyard secret rm SERVICE NAME      new deployments no longer get it

The value is never an argument (it would land in the shell's history and in ``ps``): piped in
(``printf %s "$PW" | shipyard secret set hello DB_PASSWORD``), one trailing newline stripped
(what ``echo`` and a file end with), or typed at a hidden prompt. An empty value is refused.
Writes need a token with ``secret:write`` for the service, listing ``deployment:read`` (minted
from ``--data-dir`` like the other commands). Exit 0 done, 1 the server failed, 2 bad input or
refused.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from shipyard.cli.client import DEFAULT_SERVER
from shipyard.cli.common import OptDataDir, Server, Token
from shipyard.cli.safe import console, shown

secret_app = typer.Typer(
    name="secret",
    help="A service's app secrets: set (value from stdin), list, rm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Service = Annotated[str, typer.Argument(help="The service.")]
Name = Annotated[str, typer.Argument(help="The secret's name, e.g. DB_PASSWORD.")]

err = console(stderr=True)


def read_value(name: str) -> str:
    """The value: a hidden prompt on a terminal, else stdin to its end with one trailing
    newline stripped. Exit 2 for an empty one."""
    from shipyard.cli.common import fail

    if sys.stdin.isatty():
        value = str(typer.prompt(f"Value of {name}", hide_input=True, err=True))
    else:
        value = sys.stdin.read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise fail(
            f"no value for {name} on stdin: pipe it in, e.g. "
            f'printf %s "$VALUE" | shipyard secret set SERVICE {name}'
        )
    return value


@secret_app.command("set")
def set_secret(
    service: Service,
    name: Name,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Set secret NAME of SERVICE to the value read from stdin (a new version).

    Deployments from now on run with it (in the replicas' environment, or as a file, as the
    manifest's \\[run] secrets / secret_files say); running replicas keep the version they
    were deployed with until the next deployment."""
    from shipyard.cli import main  # main mounts this module: import it when a command runs

    value = read_value(name)
    client = main._client(server, token, data_dir, "secret:write")
    done = main._check(
        client.request("PUT", f"/api/v1/services/{service}/secrets/{name}", json={"value": value})
    )
    err.print(
        f"set [bold]{shown(done['name'])}[/bold] of {shown(done['service'])}: version "
        f"{shown(done['version'])} (the next deployment of {shown(done['service'])} gets it)"
    )


@secret_app.command("list")
def list_secrets(
    service: Service,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """List SERVICE's secrets: name, newest version, when and by whom it was set (no values)."""
    from shipyard.cli import main

    client = main._client(server, token, data_dir, "deployment:read")
    done = main._check(client.request("GET", f"/api/v1/services/{service}/secrets"))
    if not done["secrets"]:
        err.print(f"{shown(service)} has no secrets; `shipyard secret set {shown(service)} NAME`")
        return
    table = Table(box=box.SIMPLE)
    for column in ("name", "version", "updated", "updated by"):
        table.add_column(column, overflow="fold")
    for row in done["secrets"]:
        table.add_row(
            shown(row["name"]),
            shown(row["version"]),
            shown(row["updated_at"]),
            shown(row["updated_by"]),
        )
    console(width=200).print(table)


@secret_app.command("rm")
def remove_secret(
    service: Service,
    name: Name,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Remove secret NAME of SERVICE: a deployment naming it fails until it is set again.

    Revisions deployed with it keep their version, so rolling back to one still works."""
    from shipyard.cli import main

    client = main._client(server, token, data_dir, "secret:write")
    done = main._check(client.request("DELETE", f"/api/v1/services/{service}/secrets/{name}"))
    err.print(
        f"removed [bold]{shown(done['name'])}[/bold] of {shown(done['service'])} (its newest "
        f"version was {shown(done['version'])})"
    )
