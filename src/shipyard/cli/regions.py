"""``shipyard region``: add, list and remove remote regions from a terminal.

Works on the data directory directly, like ``shipyard token`` (cli/token.py): the region registry
in its store, the fleet PKI in ``<data>/fleet/`` and its audit trail (``region.added`` /
``region.removed`` by ``local:<os user>``), through ``api.fleet_control.RegionService``.
``add`` prints the join command (with every replica's fleet listener URL from
``<shared>/fleet.json``, which ``shipyard serve --fleet-listen`` writes) and the token alone as
the LAST line of stdout, so ``TOKEN=$(shipyard region add eu | tail -1)`` works. A running
server stops dialing a region removed here within seconds (``RegionService.sync_runtimes``).
Registered by ``cli.main``. Exit 2 for bad input or a directory no server has used, 1 for an
unknown region or a refused removal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from shipyard.api.fleet_control import DEFAULT_TOKEN_TTL, RegionService
from shipyard.api.regions import join_command
from shipyard.cli.common import Database, SharedDir
from shipyard.cli.safe import console, neutralised, shown
from shipyard.cli.token import DataDir, local_actor, require_server_state
from shipyard.errors import Conflict, InvalidInput, NotFound, TransientError

region_app = typer.Typer(
    name="region",
    help="Add, list and remove remote regions (agents joined over mTLS).",
    no_args_is_help=True,
)


@region_app.callback()
def _group() -> None:
    """Add, list and remove remote regions (agents joined over mTLS)."""


def _service(data_dir: Path, shared_dir: Path | None, database: str | None) -> RegionService:
    try:
        require_server_state(data_dir, shared_dir)
        return RegionService.for_data_dir(data_dir, shared_dir, database=database)
    except (InvalidInput, TransientError) as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@region_app.command()
def add(
    name: Annotated[str, typer.Argument(help="The region's name (a DNS label).")],
    data_dir: DataDir,
    ttl: Annotated[
        int, typer.Option("--ttl", help="Seconds the one-time join token is valid.")
    ] = DEFAULT_TOKEN_TTL,
    shared_dir: SharedDir = None,
    database: Database = None,
) -> None:
    """Register region NAME and print its one-time join token (the last line of stdout)."""
    service = _service(data_dir, shared_dir, database)
    try:
        added = asyncio.run(service.add(name, ttl, by=local_actor()))
    except (InvalidInput, Conflict) as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    finally:
        service.close()
    typer.echo(
        f"region {added.region} added; its join token (used once) expires "
        f"{_when(added.expires_at)}; fleet CA sha256 {added.fingerprint}",
        err=True,
    )
    command = join_command(service, added.token)
    if command is None:
        typer.echo(
            "no fleet listener has run yet: start `shipyard serve --fleet-listen HOST:PORT`, "
            "then run on the agent's machine: shipyard agent --join https://HOST:PORT "
            "--token TOKEN --data-dir DIR --listen HOST:PORT",
            err=True,
        )
    else:
        typer.echo(command)
    typer.echo(added.token)


@region_app.command("list")
def list_regions(
    data_dir: DataDir, shared_dir: SharedDir = None, database: Database = None
) -> None:
    """List registered regions: agent URL, when it joined, its certificate's serial."""
    service = _service(data_dir, shared_dir, database)
    try:
        rows = asyncio.run(service.list())
    finally:
        service.close()
    table = Table(box=box.SIMPLE)
    for column in ("region", "agent", "joined", "certificate serial"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            shown(row.name),
            shown(row.agent_url or "(not joined)"),
            _when(row.joined_at),
            shown(row.cert_serial or "-"),
        )
    console(width=200).print(table)


@region_app.command()
def remove(
    name: Annotated[str, typer.Argument(help="The region to remove.")],
    data_dir: DataDir,
    shared_dir: SharedDir = None,
    database: Database = None,
) -> None:
    """Remove region NAME: its agent's certificate is refused from now on (refused while a
    deployment is active there)."""
    service = _service(data_dir, shared_dir, database)
    try:
        row = asyncio.run(service.remove(name, by=local_actor()))
    except (NotFound, Conflict) as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    finally:
        service.close()
    typer.echo(f"region {neutralised(row.name)} removed")
