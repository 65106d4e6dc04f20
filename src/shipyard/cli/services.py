"""``shipyard scale SERVICE N`` and ``shipyard service delete NAME``: a service's replicas and
its existence, outside any deployment. Mounted by cli/main.py (``app.add_typer(services_app)``);
the server side is api/service_ops.py.

    shipyard scale web 4 [--region R]            health-gated up, drained down; audited
    shipyard service delete web [--region R] [--yes]

Both need a token with their own permission (``service:scale``, ``service:delete``; minted from
``--data-dir`` like the other commands), and both are refused with the running deployment's id
while one is in flight. Exit 0 done, 1 the server failed it (a new replica never got healthy),
2 bad input, refused or not confirmed.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from shipyard.cli.client import DEFAULT_SERVER
from shipyard.cli.common import OptDataDir, Server, Token
from shipyard.cli.safe import console, shown

services_app = typer.Typer(pretty_exceptions_enable=False)
service_app = typer.Typer(
    name="service", help="Services outside deployments: delete.", no_args_is_help=True
)
services_app.add_typer(service_app, name="service")

Region = Annotated[str, typer.Option(help="The service's region.")]

err = console(stderr=True)


# Typer renders docstrings as Rich markup: ``\\[`` keeps a literal bracket.
@services_app.command()
def scale(
    service: Annotated[str, typer.Argument(help="The service.")],
    replicas: Annotated[int, typer.Argument(help="Replicas to run, 1 to 64.", min=1, max=64)],
    region: Region = "local",
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Run REPLICAS replicas of SERVICE's serving revision, without a deployment.

    New replicas take traffic only once healthy; removed ones finish their requests first. The
    count holds while this revision serves; the next deployment runs its manifest's
    \\[run] replicas."""
    from shipyard.cli import main  # main mounts this module: import it when a command runs

    client = main._client(server, token, data_dir, "service:scale")
    done = main._check(
        client.request(
            "PUT",
            f"/api/v1/services/{service}/replicas",
            params={"region": region},
            json={"replicas": replicas},
        )
    )
    change = (
        f"started {len(done['started'])}"
        if done["started"]
        else f"drained and stopped {len(done['stopped'])}"
        if done["stopped"]
        else "already ran that many"
    )
    err.print(
        f"[bold]{shown(done['service'])}[/bold]@{shown(done['region'])}: "
        f"{shown(done['revision'])} runs {shown(done['replicas'])} replica(s), was "
        f"{shown(done['previous'])} ({shown(change)})"
    )


@service_app.command()
def delete(
    name: Annotated[str, typer.Argument(help="The service to delete.")],
    region: Region = "local",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Delete a service: stop every replica (drained), remove its route and its record.

    Its deployments stay in `shipyard history` and the audit trail; deploying it again creates
    it anew (on a new port). Asks first unless --yes."""
    from shipyard.cli import main  # main mounts this module: import it when a command runs
    from shipyard.cli.common import fail

    if not yes:
        if not interactive():
            raise fail(f"deleting {name} needs confirmation: run it in a terminal, or pass --yes")
        prompt = (
            f"Delete service {neutral(name)} in region {neutral(region)}: stop every replica "
            "and remove its route?"
        )
        if not typer.confirm(prompt, default=False):
            raise fail("not deleted")
    client = main._client(server, token, data_dir, "service:delete")
    done = main._check(
        client.request("DELETE", f"/api/v1/services/{name}", params={"region": region})
    )
    err.print(
        f"deleted [bold]{shown(done['service'])}[/bold]@{shown(done['region'])}: "
        f"{shown(done['replicas'])} replica(s) of {shown(', '.join(done['revisions']) or '-')} "
        f"stopped, route {shown(done['url'] or '-')} removed"
    )


def interactive() -> bool:
    """Whether someone can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def neutral(text: str) -> str:
    """A name in a prompt (``typer.confirm`` prints it without Rich)."""
    from shipyard.cli.safe import neutralised

    return neutralised(text)
