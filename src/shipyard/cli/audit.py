"""``shipyard audit``: check and read the tamper-evident audit trail from a terminal.

The lead's main CLI mounts ``audit_app`` as ``shipyard audit``. Both commands open the database
read-only (audit/log.py ``verify_database`` / ``read_records``), so they are safe to run while
``shipyard serve`` is writing.

Exit codes: 0 intact / listed; 1 the trail is not intact (names the first bad record) or cannot be
read; 2 no such data directory or database, or bad flags.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from shipyard.audit.chain import AuditRecord, CorruptRecord
from shipyard.audit.log import ANCHOR_FILENAME, read_records, verify_database
from shipyard.errors import InvalidInput

DB_FILENAME = "shipyard.db"

audit_app = typer.Typer(
    name="audit", help="Check and read the tamper-evident audit trail.", no_args_is_help=True
)

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Shipyard's data directory (holds shipyard.db).")
]


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


def _database(data_dir: Path) -> Path:
    """The database path, or exit 2 saying what is missing."""
    if not data_dir.is_dir():
        typer.echo(f"error: data directory {data_dir} does not exist", err=True)
        raise typer.Exit(2)
    db_path = data_dir / DB_FILENAME
    if not db_path.is_file():
        typer.echo(
            f"error: no Shipyard database at {db_path} (has `shipyard serve` run with this "
            f"--data-dir?)",
            err=True,
        )
        raise typer.Exit(2)
    return db_path


@audit_app.command()
def verify(data_dir: DataDir) -> None:
    """Walk the hash chain and check it against the anchor; exit 1 naming the first bad record."""
    report = verify_database(_database(data_dir), data_dir / ANCHOR_FILENAME)
    if report.ok:
        typer.echo(f"audit trail intact: {report.records} records")
        return
    where = f"record {report.first_bad_seq}" if report.first_bad_seq is not None else "trail"
    typer.echo(f"audit trail NOT intact: first bad {where}: {report.reason}")
    raise typer.Exit(1)


@audit_app.command()
def show(
    data_dir: DataDir,
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Only this deployment's records.")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the newest N records.")
    ] = None,
) -> None:
    """List audit records, oldest first."""
    db_path = _database(data_dir)
    try:
        records = read_records(db_path, deployment_id=deployment, limit=limit)
    except CorruptRecord as exc:
        typer.echo(
            f"error: audit record {exc.detail.get('seq')} cannot be read: {exc.message}; "
            f"run `shipyard audit verify`",
            err=True,
        )
        raise typer.Exit(1) from exc
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    if output is OutputFormat.json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2, ensure_ascii=False))
    else:
        _print_table(records)


def _print_table(records: list[AuditRecord]) -> None:
    table = Table(
        title=f"audit trail ({len(records)} records; --format json for every field)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)
    # fold, never truncate: an audit listing must not hide part of a value
    for column in ("event", "deployment", "service", "region", "user", "status"):
        table.add_column(column, overflow="fold")
    table.add_column("ms", justify="right", overflow="fold")
    for r in records:
        table.add_row(
            str(r.seq),
            r.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            r.event_type,
            *(v or "" for v in (r.deployment_id, r.service, r.region, r.user, r.status)),
            "" if r.duration_ms is None else str(r.duration_ms),
        )
    # A terminal gets its own width; a pipe gets room for whole UUIDs on one line.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
