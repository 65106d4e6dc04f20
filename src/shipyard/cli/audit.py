"""``shipyard audit``: check, prove and read the tamper-evident audit trail from a terminal.

The lead's main CLI mounts ``audit_app`` as ``shipyard audit``:

    shipyard audit verify [--checkpoint FILE|URL [--checkpoint-key VKEY]]
    shipyard audit prove RECORD_ID [--checkpoint FILE|URL] [--checkpoint-key VKEY]
    shipyard audit show [--deployment ID] [--format json] [--limit N]

each with ``--data-dir DIR`` (SQLite in it, its anchor, its checkpoint key) and/or
``--database URL`` (the PostgreSQL store replicas share; with a ``--data-dir`` too, that
replica's anchor is checked as well). Every command opens the database read-only
(``store.engine.open_read_only``), so they are safe to run while ``shipyard serve`` is writing.
``verify`` alone proves internal consistency (the chain, the anchor and the database's head) and
says which records no witness has a checkpoint for; with ``--checkpoint`` it also proves that
today's trail extends the witness's checkpoint (audit/proving.py).

Exit codes: 0 intact / consistent / listed; 1 the trail is not intact, does not extend the
checkpoint, the checkpoint's signature fails, or the trail cannot be read; 2 no such data
directory, database, checkpoint or key, or bad flags.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich import box
from rich.table import Table
from sqlalchemy import Engine

from shipyard.audit import proving
from shipyard.audit.chain import AuditRecord, CorruptRecord
from shipyard.audit.checkpoint import (
    Checkpoint,
    CheckpointInvalid,
    CheckpointKeyError,
    CheckpointSigner,
    load_verifier,
)
from shipyard.audit.log import (
    ANCHOR_FILENAME,
    read_publications,
    read_records,
    read_rows,
    verify_database,
)
from shipyard.cli.common import Database, SharedDir
from shipyard.cli.safe import console, neutralised, shown
from shipyard.domain import deployment_ids
from shipyard.errors import AmbiguousDeploymentId, InvalidInput
from shipyard.store.db import Store
from shipyard.store.engine import open_read_only

DB_FILENAME = "shipyard.db"

audit_app = typer.Typer(
    name="audit", help="Check and read the tamper-evident audit trail.", no_args_is_help=True
)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Shipyard's data directory (holds shipyard.db, or with --database the anchor).",
    ),
]


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


@contextlib.contextmanager
def _trail(data_dir: Path | None, database: str | None) -> Iterator[Engine]:
    """A read-only engine on the store, or exit 2 saying what is missing."""
    if data_dir is not None and not data_dir.is_dir():
        typer.echo(f"error: data directory {data_dir} does not exist", err=True)
        raise typer.Exit(2)
    if database is None:
        if data_dir is None:
            typer.echo("error: pass --data-dir DIR or --database URL", err=True)
            raise typer.Exit(2)
        db_path = data_dir / DB_FILENAME
        if not db_path.is_file():
            typer.echo(
                f"error: no Shipyard database at {db_path} (has `shipyard serve` run with this "
                f"--data-dir?)",
                err=True,
            )
            raise typer.Exit(2)
    try:
        engine = open_read_only(database, data_dir or Path.cwd())
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    try:
        yield engine
    finally:
        engine.dispose()


def _anchor(data_dir: Path | None) -> Path | None:
    return data_dir / ANCHOR_FILENAME if data_dir is not None else None


CheckpointSource = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="A checkpoint published to a witness: its file path or http(s) URL.",
    ),
]
CheckpointKey = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint-key",
        help="The log's verifier key (a copy of <data_dir>/keys/checkpoint.vkey, or a PEM "
        "public key). Default: derived from the data directory's checkpoint key.",
    ),
]


@audit_app.command()
def verify(
    data_dir: DataDir = None,
    database: Database = None,
    checkpoint: CheckpointSource = None,
    checkpoint_key: CheckpointKey = None,
    shared_dir: SharedDir = None,
) -> None:
    """Walk the hash chain and check it against the anchor; exit 1 naming the first bad record.

    With --checkpoint, also check that today's trail extends the checkpoint a witness keeps (an
    RFC 9162 consistency proof): that catches a rewrite of the database *and* the anchor.
    """
    with _trail(data_dir, database) as db:
        _verify(db, data_dir, shared_dir or data_dir, checkpoint, checkpoint_key)


def _verify(
    db_path: Engine,
    data_dir: Path | None,
    keys_dir: Path | None,
    checkpoint: str | None,
    checkpoint_key: Path | None,
) -> None:
    leaves: list[bytes] = []
    report = verify_database(db_path, _anchor(data_dir), leaves)
    if report.ok:
        typer.echo(f"audit trail intact: {report.records} records")
    else:
        where = f"record {report.first_bad_seq}" if report.first_bad_seq is not None else "trail"
        typer.echo(f"audit trail NOT intact: first bad {where}: {neutralised(report.reason)}")
    if checkpoint is None:
        _say_coverage(db_path, report.records)
        if not report.ok:
            raise typer.Exit(1)
        return
    signed = _open_checkpoint(checkpoint, keys_dir, checkpoint_key)
    try:
        if not report.ok:  # the walk stopped at the first bad record: hash every row as stored
            leaves = proving.leaf_hashes(read_rows(db_path))
    except (CorruptRecord, InvalidInput) as exc:
        typer.echo(f"checkpoint NOT verified: the trail cannot be read: {exc.message}")
        raise typer.Exit(1) from exc
    result = proving.check_consistency(signed, leaves)
    if not result.ok:
        typer.echo(
            f"audit trail does NOT match the checkpoint {signed.origin} at tree size "
            f"{signed.size}: {result.reason}"
        )
        raise typer.Exit(1)
    typer.echo(
        f"consistent with checkpoint {signed.origin} at tree size {signed.size} "
        f"(signature verified; consistency proof of {result.proof_hashes} hashes to tree size "
        f"{result.tree_size})"
    )
    if signed.size < len(leaves):
        typer.echo(
            f"records {signed.size + 1}..{len(leaves)} are newer than this checkpoint: only "
            "internal consistency is proven for them"
        )
    if not report.ok:
        raise typer.Exit(1)


def _say_coverage(db_path: Engine, records: int) -> None:
    """The line that says what ``verify`` without --checkpoint could not prove."""
    try:
        publications = read_publications(db_path)
    except InvalidInput:
        publications = []
    gap = proving.uncovered(publications, records)
    if gap is not None:
        first, last = gap
        span = f"record {first}" if first == last else f"records {first}..{last}"
        typer.echo(
            f"no checkpoint was published to a witness for {span}; only internal consistency "
            "is proven (run `shipyard serve --witness PATH_OR_URL`)"
        )
    elif publications:
        witnesses = ", ".join(sorted({p.witness for p in publications}))
        typer.echo(
            f"checkpoints published to: {witnesses}; `shipyard audit verify --checkpoint "
            "PATH_OR_URL` checks the trail against a witness's copy"
        )


@audit_app.command()
def prove(
    record_id: Annotated[int, typer.Argument(min=1, help="The record's seq.")],
    data_dir: DataDir = None,
    database: Database = None,
    checkpoint: CheckpointSource = None,
    checkpoint_key: CheckpointKey = None,
    shared_dir: SharedDir = None,
) -> None:
    """Print an RFC 9162 inclusion proof of a record in a signed checkpoint, as JSON.

    The checkpoint is --checkpoint's, or else the newest one a witness accepted. Any RFC 9162 /
    C2SP verifier can check the proof against the checkpoint's root and the checkpoint's signature
    against the log's verifier key (<data_dir>/keys/checkpoint.vkey).
    """
    with _trail(data_dir, database) as db:
        _prove(record_id, db, shared_dir or data_dir, checkpoint, checkpoint_key)


def _prove(
    record_id: int,
    db_path: Engine,
    keys_dir: Path | None,
    checkpoint: str | None,
    checkpoint_key: Path | None,
) -> None:
    if checkpoint is not None:
        source = checkpoint
        note = _fetch_checkpoint(checkpoint)
    else:
        publications = read_publications(db_path)
        if not publications or max(p.tree_size for p in publications) < record_id:
            latest = max((p.tree_size for p in publications), default=0)
            typer.echo(
                f"error: record {record_id} is not covered by a checkpoint a witness accepted "
                f"(the newest covers records 1..{latest}); wait for the next publication of "
                "`shipyard serve --witness` or pass --checkpoint PATH_OR_URL",
                err=True,
            )
            raise typer.Exit(1)
        newest = max(publications, key=lambda p: p.tree_size)
        source, note = f"{newest.witness} (as recorded)", newest.checkpoint
    signed = _verify_note(note, source, keys_dir, checkpoint_key)
    try:
        rows = read_rows(db_path)
        answer = proving.inclusion(record_id, rows, proving.leaf_hashes(rows), signed)
    except (CorruptRecord, InvalidInput) as exc:
        typer.echo(f"error: the trail cannot be read: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    answer["checkpoint"] = note
    typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))


def _open_checkpoint(source: str, keys_dir: Path | None, key: Path | None) -> Checkpoint:
    return _verify_note(_fetch_checkpoint(source), source, keys_dir, key)


def _verify_note(note: str, source: str, keys_dir: Path | None, key: Path | None) -> Checkpoint:
    """The checkpoint if the log's key (``key``, else ``keys_dir``'s: the shared or data
    directory) signed it; exit 1 if not, 2 if there is no key."""
    try:
        if key is not None:
            verifier = load_verifier(key)
        elif keys_dir is not None:
            verifier = CheckpointSigner.load(keys_dir)
        else:
            typer.echo(
                "error: checking a checkpoint needs the log's verifier key: pass "
                "--checkpoint-key VKEY, or --data-dir (and --shared-dir) of a control plane",
                err=True,
            )
            raise typer.Exit(2)
    except CheckpointKeyError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    try:
        return verifier.open(note)
    except CheckpointInvalid as exc:
        typer.echo(f"checkpoint from {neutralised(source)} REJECTED: {neutralised(exc.message)}")
        raise typer.Exit(1) from exc


def _fetch_checkpoint(source: str) -> str:
    """The checkpoint's text from a file or an http(s) URL; exit 2 saying why it could not."""
    if source.startswith(("http://", "https://")):
        try:
            resp = httpx.get(source, timeout=10.0)
        except httpx.HTTPError as exc:
            typer.echo(f"error: cannot fetch checkpoint {source}: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not resp.is_success:
            typer.echo(f"error: {source} answered {resp.status_code}", err=True)
            raise typer.Exit(2)
        return resp.text
    try:
        return Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        typer.echo(f"error: cannot read checkpoint {source}: {exc}", err=True)
        raise typer.Exit(2) from exc


@audit_app.command()
def show(
    data_dir: DataDir = None,
    database: Database = None,
    deployment: Annotated[
        str | None,
        typer.Option(
            "--deployment", help="Only this deployment's records (its id or a unique prefix)."
        ),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the newest N records.")
    ] = None,
) -> None:
    """List audit records, oldest first."""
    with _trail(data_dir, database) as db:
        records = _read(db, deployment, limit)
    if output is OutputFormat.json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2, ensure_ascii=False))
    else:
        _print_table(records)


def _read(db_path: Engine, deployment: str | None, limit: int | None) -> list[AuditRecord]:
    try:
        if deployment is not None:
            deployment = _deployment_id(db_path, deployment)
        records = read_records(db_path, deployment_id=deployment, limit=limit)
    except CorruptRecord as exc:
        typer.echo(
            f"error: audit record {exc.detail.get('seq')} cannot be read: {exc.message}; "
            f"run `shipyard audit verify`",
            err=True,
        )
        raise typer.Exit(1) from exc
    except AmbiguousDeploymentId as exc:
        typer.echo(f"error: {neutralised(exc.message)}", err=True)
        raise typer.Exit(2) from exc
    except InvalidInput as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    return records


def _deployment_id(engine: Engine, reference: str) -> str:
    """The full id a unique prefix names among the store's deployments (as the API resolves
    it, ``domain/deployment_ids.py``); ``AmbiguousDeploymentId`` when it names several. A full
    id, or anything no deployment id starts with, filters the records as written."""
    if not re.fullmatch(deployment_ids.PATTERN, reference):
        return reference
    prefix = reference.lower()
    if len(prefix) == deployment_ids.FULL_LENGTH:
        return prefix
    matches = Store(engine).deployment_ids_with_prefix(prefix)
    return deployment_ids.choose(prefix, matches) if matches else reference


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
            shown(r.event_type),
            *(shown(v or "") for v in (r.deployment_id, r.service, r.region, r.user, r.status)),
            "" if r.duration_ms is None else str(r.duration_ms),
        )
    # A terminal gets its own width; a pipe gets room for whole UUIDs on one line.
    console(width=None if sys.stdout.isatty() else 200).print(table)
