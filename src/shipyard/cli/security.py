"""``shipyard scan`` and ``shipyard vulndb``: the security gate's scanner from a terminal.

``security_app`` holds both commands; the main CLI mounts them at the top level with
``app.add_typer(security_app)`` (no name: the commands join ``shipyard`` itself).

    shipyard scan PATH [--db DIR] [--policy FILE] [--format table|json]
        PATH: a built artifact directory, a `pip install --target` directory, a virtual
        environment, a pip installation report (.json), or a requirements/lock file. Directories
        are read as the deploy gate reads an artifact; a requirements file gives only its pins.
    shipyard scan --image REF [--builders-config FILE] [...]
        an image on Docker Engine (the docker builder's, from --builders-config, else
        DOCKER_HOST), exported and read as the deploy gate reads images (Python, dpkg, apk).
        The policy: --policy, else the [security] table of a shipyard.toml beside PATH, else the
        built-in default, chosen and applied by the gate's own code (security/gate.py).
    shipyard vulndb [--db DIR]
        what the offline OSV database holds: advisories, packages, withdrawn, corrupt files.

The database is ``--db``, else ``$SHIPYARD_OSV_DB``, else ``<data-dir>/osv``; its parsed form is
cached under ``<data-dir>/cache/osv`` (or the user cache directory without a data dir).

Exit codes: 0 nothing blocks; 1 the policy blocks (findings listed); 2 bad input (no such path,
no database, malformed policy), with a message saying what to fix.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shipyard.build.image_export import ImageExporter
from shipyard.build.registry import BuildConfig
from shipyard.cli.build import _read_builders
from shipyard.cli.safe import console, shown
from shipyard.domain.manifest import MANIFEST_NAME
from shipyard.errors import InvalidInput, SecurityScanFailed
from shipyard.orchestrator.image_scan import export_into
from shipyard.security import gate, inventory, osv, policy, rootfs
from shipyard.security.cvss import Severity
from shipyard.security.scanning import Finding, OsvScanner

security_app = typer.Typer(
    help="Scan for known vulnerabilities with the offline OSV database.",
    no_args_is_help=True,
)


def _out() -> Console:
    # Made per call, not at import: width and colour follow the environment of each run.
    return console(highlight=False)


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="OSV database: a directory or .zip of OSV JSON/YAML files. "
        "Default: $SHIPYARD_OSV_DB, else <data-dir>/osv.",
        show_default=False,
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="SHIPYARD_DATA_DIR", help="Shipyard's data directory."),
]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table or json.")]

_STYLE = {
    Severity.CRITICAL: "bold red",
    Severity.HIGH: "red",
    Severity.MEDIUM: "yellow",
    Severity.LOW: "cyan",
    Severity.NONE: "dim",
    Severity.UNKNOWN: "magenta",
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    console(stderr=True).print(f"[red]error:[/red] {shown(message, multiline=True)}")
    return typer.Exit(code)


def resolve_db(db: Path | None, data_dir: Path | None) -> Path:
    """``--db``, else ``$SHIPYARD_OSV_DB``, else ``<data-dir>/osv``; InvalidInput if missing."""
    if db is None and (env := os.environ.get("SHIPYARD_OSV_DB")):
        db = Path(env)
    if db is None and data_dir is not None:
        db = data_dir / "osv"
    if db is None:
        raise InvalidInput(
            "no vulnerability database: pass --db DIR, set SHIPYARD_OSV_DB, or put an OSV "
            "database (e.g. a copy of the PyPA advisory-database) at <data-dir>/osv"
        )
    if not db.exists():
        raise InvalidInput(
            f"vulnerability database {db} does not exist: pass --db DIR or set SHIPYARD_OSV_DB "
            "to a directory or .zip of OSV advisories"
        )
    return db


def _cache_dir(data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir / "cache" / "osv"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shipyard" / "osv"


def _load(db: Path | None, data_dir: Path | None) -> osv.OsvDatabase:
    return osv.load(resolve_db(db, data_dir), cache_dir=_cache_dir(data_dir))


def _severity_cell(f: Finding) -> str:
    score = f" {f.score:.1f}" if f.score is not None else ""
    return f"[{_STYLE[f.severity]}]{f.severity.value}{score}[/]"


def _policy_for(path: Path | None, policy_file: Path | None) -> tuple[policy.SecurityPolicy, str]:
    """The policy ``scan`` judges with and where it came from, chosen as the deploy gate
    chooses (``gate.effective_policy``): ``--policy``, else the ``[security]`` table of the
    ``shipyard.toml`` beside PATH (in the directory, or the requirements file's directory),
    else the built-in default (an image has no manifest beside it)."""
    if policy_file is not None:
        return gate.effective_policy(policy.load_policy(policy_file), None), str(policy_file)
    if path is None:
        return gate.effective_policy(None, None), "built-in default"
    folder = path if path.is_dir() else path.parent
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            data = tomllib.loads(manifest_path.read_text(encoding="utf-8", errors="replace"))
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{manifest_path}: not valid TOML: {exc}") from exc
        if data.get("security") is not None:
            # What the gate reads of the manifest: its [security] table, validated alike.
            manifest = SimpleNamespace(security=data["security"])
            return gate.effective_policy(None, manifest), f"{manifest_path} [security]"
    return gate.effective_policy(None, None), "built-in default"


def _unresolved_note(inv: inventory.Inventory) -> str:
    unpinned = len(inv.skipped)
    return (
        f"Only the pinned direct dependencies of {inv.source} were scanned "
        f"({len(inv.packages)} package(s); {unpinned} line(s) skipped above). Dependencies of "
        "dependencies are scanned only if this file lists them, and the versions pip would pick "
        "for loose pins are not known here. To scan the resolved environment, scan what gets "
        "installed: the built artifact (shipyard scan ARTIFACT_DIR), a "
        "`pip install --target DIR -r FILE` directory, or pip's resolution: "
        "`pip install --dry-run --ignore-installed --report report.json -r FILE`, then "
        "`shipyard scan report.json`."
    )


def _table(title: str, rows: list[tuple[Finding, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in (
        "package",
        "version",
        "advisory id",
        "aliases",
        "severity",
        "fixed versions",
        "verdict: why",
    ):
        table.add_column(col, overflow="fold")
    for f, verdict in rows:
        table.add_row(
            shown(f.package),
            shown(f.version),
            shown(f.advisory_id),
            shown(", ".join((*f.advisory_ids[1:], *f.aliases)) or "-"),
            _severity_cell(f),
            shown(", ".join(f.fixed_versions) or "-"),
            verdict,
        )
    return table


def _image_inventory(image: str, builders_config: Path | None) -> inventory.Inventory:
    """The packages of ``image`` on the Docker builder's engine (``--builders-config``'s
    ``docker.base_url``, else ``DOCKER_HOST``), read from its exported files as the deploy gate
    reads them."""
    config = BuildConfig(
        data_dir=Path(tempfile.gettempdir()), builders=_read_builders(builders_config)
    )
    exporter = ImageExporter.from_build_config(config)
    with tempfile.TemporaryDirectory(prefix="shipyard-scan-") as tmp:
        export_into(exporter, image, Path(tmp))
        return rootfs.image_inventory(Path(tmp), image)


@security_app.command("scan")
def scan(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Artifact directory, virtual environment, or requirements/lock file.",
            show_default=False,
        ),
    ] = None,
    db: DbOption = None,
    policy_file: Annotated[
        Path | None,
        typer.Option("--policy", help="Policy file (TOML \\[security] table, e.g. shipyard.toml)."),
    ] = None,
    output: FormatOption = OutputFormat.table,
    data_dir: DataDirOption = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="Scan an image on Docker Engine instead of PATH (reference or image ID): its "
            "Python, dpkg and apk packages, as the deploy gate scans images.",
            show_default=False,
        ),
    ] = None,
    builders_config: Annotated[
        Path | None,
        typer.Option(
            "--builders-config",
            help="With --image: the builders' JSON settings, as for `shipyard build` "
            '({"docker": {"base_url": "unix:///..."}}); default: DOCKER_HOST.',
            show_default=False,
        ),
    ] = None,
) -> None:
    """List known vulnerabilities of what PATH (or --image) contains, blocking or not and why;
    exit 1 when the policy blocks."""
    if (path is None) == (image is None):
        raise _fail("give either PATH or --image REF (exactly one)")
    try:
        if image is not None:
            pol, pol_source = _policy_for(None, policy_file)
            database = _load(db, data_dir)  # first: no export when the database is missing
            inv = _image_inventory(image, builders_config)
        else:
            assert path is not None
            pol, pol_source = _policy_for(path, policy_file)
            inv = inventory.from_path(path)
            database = _load(db, data_dir)
    except (InvalidInput, SecurityScanFailed) as exc:
        raise _fail(exc.message) from exc
    # The deploy gate's own scan-and-judge step: the same findings block here and there.
    assessment = gate.assess(OsvScanner(database), inv, pol, today=dt.datetime.now(dt.UTC).date())
    evaluation = assessment.evaluation
    if output is OutputFormat.json:
        payload: dict[str, Any] = {
            "source": inv.source,
            "kind": inv.kind,
            "resolved": inv.resolved,
            "note": None if inv.resolved else _unresolved_note(inv),
            "packages": len(inv.packages),
            "skipped": [{"source": s.source, "reason": s.reason} for s in inv.skipped],
            "findings": [v.to_dict() for v in evaluation.verdicts()],
            **evaluation.to_dict(),
            "policy_source": pol_source,
            "database": {"path": database.path, "advisories": len(database.advisories)},
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_scan(inv, evaluation, database, pol_source)
    if evaluation.blocked:
        raise typer.Exit(1)


_STATUS = {
    "block": "[bold red]BLOCKS[/]",
    "allowed": "[green]allowed[/]",
    "report": "[yellow]does not block[/]",
}


def _print_scan(
    inv: inventory.Inventory,
    evaluation: policy.PolicyEvaluation,
    database: osv.OsvDatabase,
    policy_source: str,
) -> None:
    out = _out()
    rows = [(v.finding, f"{_STATUS[v.status]}: {shown(v.why)}") for v in evaluation.verdicts()]
    what = "resolved environment" if inv.resolved else "direct pins only"
    out.print(
        f"Scanned {len(inv.packages)} package(s) from {shown(inv.source)} "
        f"({shown(inv.kind)}, {what}) against {len(database.advisories)} advisories in "
        f"{shown(database.path)}."
    )
    out.print(f"Policy: {shown(policy_source)}: {shown(evaluation.policy.describe())}.")
    for s in inv.skipped:
        out.print(f"[dim]skipped {shown(s.source)}: {shown(s.reason)}[/]")
    if rows:
        out.print(_table("Findings (blocking first)", rows))
    else:
        out.print("[green]No known vulnerabilities.[/]")
    if not inv.resolved:
        out.print(f"[yellow]note:[/] {shown(_unresolved_note(inv))}")
    for e in evaluation.expired:
        matched = ", ".join(f.advisory_id for f in e.matched) or "no current finding"
        out.print(
            f"[yellow]expired allow entry[/] {shown(e.entry.id)} "
            f"(expired {e.entry.expires.isoformat()}): "
            f"no longer applies; matched {shown(matched)}"
        )
    verdict = "[bold red]BLOCKED[/]" if evaluation.blocked else "[green]passes[/]"
    out.print(
        f"{verdict}: {shown(evaluation.summary())} (policy: {shown(evaluation.policy.describe())})"
    )


@security_app.command("vulndb")
def vulndb(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    output: FormatOption = OutputFormat.table,
) -> None:
    """What the offline vulnerability database holds, and which files could not be used."""
    try:
        database = _load(db, data_dir)
    except InvalidInput as exc:
        raise _fail(exc.message) from exc
    stats = database.stats()
    if output is OutputFormat.json:
        typer.echo(
            json.dumps(
                {
                    "path": stats.path,
                    "files": stats.files,
                    "advisories": stats.advisories,
                    "packages": stats.packages,
                    "withdrawn": stats.withdrawn,
                    "ecosystems": dict(stats.ecosystems),
                    "problems": [{"path": p.path, "reason": p.reason} for p in stats.problems],
                    "load_seconds": round(stats.load_seconds, 3),
                    "from_cache": stats.from_cache,
                },
                indent=2,
            )
        )
        return
    table = Table(
        title=f"OSV database {shown(stats.path)}", title_justify="left", show_header=False
    )
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("files read", str(stats.files))
    table.add_row("advisories loaded", str(stats.advisories))
    table.add_row("packages", str(stats.packages))
    table.add_row(
        "ecosystems", ", ".join(f"{k} ({v})" for k, v in sorted(stats.ecosystems.items()))
    )
    table.add_row("withdrawn (ignored)", str(stats.withdrawn))
    table.add_row("skipped / corrupt files", str(len(stats.problems)))
    source = "parsed cache" if stats.from_cache else "parsed files"
    table.add_row("load time", f"{stats.load_seconds:.2f} s ({source})")
    out = _out()
    out.print(table)
    for p in stats.problems:
        out.print(f"[yellow]skipped[/] {shown(p.path)}: {shown(p.reason)}")
