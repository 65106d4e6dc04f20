"""``shipyard build``: build a repository's commit without deploying it.

The lead's main CLI mounts ``build_app`` (``app.add_typer(build_app)``: its one command becomes
``shipyard build``). It runs the same builders the orchestrator's build stage runs
(``build.registry.build_source``) against a local data directory, streams build logs to stderr
(``--format table``), and prints the artifact digest, cache hits and duration::

    shipyard build ./myapp [--branch B] [--commit SHA] [--data-dir DIR] [--format json]
                           [--no-cache]

Without ``--branch`` the repository's HEAD branch is built (``source.default_branch``), the same
default ``shipyard deploy`` uses.

``--no-cache`` builds afresh (``BuildRequest.no_cache``): no cached artifact, dependency
environment or Docker layer is reused; the result is cached for the next build.

Exit codes: 0 built; 1 the build failed (the cause is printed); 2 bad input (unknown
repository/branch/commit, invalid manifest or flags).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shipyard.build.base import Artifact, BuildRequest
from shipyard.build.registry import BuildConfig, build_source
from shipyard.build.source import branch_head, default_branch
from shipyard.cli.safe import console, shown
from shipyard.domain.models import BUILD_TIME_TARGET_MS, SourceConfig
from shipyard.errors import InvalidInput, ShipyardError

build_app = typer.Typer(
    help="Build a repository's commit without deploying it.",
    pretty_exceptions_enable=False,
)


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


@build_app.command("build")
def build(
    repository: Annotated[str, typer.Argument(help="Git URL or local path of the repository.")],
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch",
            help="Branch the commit must be on. Default: the repository's HEAD branch (the "
            "checked-out one of a local path, the default one of a remote).",
        ),
    ] = None,
    commit: Annotated[
        str | None,
        typer.Option("--commit", help="Commit id (full or abbreviated); default: branch head."),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", envvar="SHIPYARD_DATA_DIR", help="Builds, cache and artifacts."),
    ] = Path(".shipyard"),
    output: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = (
        OutputFormat.table
    ),
    builders_config: Annotated[
        Path | None,
        typer.Option(
            "--builders-config",
            help='JSON file of builder settings per kind, e.g. {"docker": {"base_url": "..."}}.',
        ),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="Build afresh: reuse no cached artifact, dependency environment or image layer "
            "(the result is still cached).",
        ),
    ] = False,
) -> None:
    """Build REPO at --commit (default: the head of --branch); print digest, cache hits, time."""
    out = console(highlight=False)
    err = console(stderr=True, highlight=False, soft_wrap=True)
    try:
        builders = _read_builders(builders_config)
        config = BuildConfig(data_dir=data_dir, builders=builders)
        artifact = asyncio.run(
            _build(
                repository,
                branch,
                commit,
                config,
                err if output is OutputFormat.table else None,
                no_cache=no_cache,
            )
        )
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {shown(_problems(exc), multiline=True)}")
        raise typer.Exit(2) from exc
    except InvalidInput as exc:
        err.print(f"[red]error:[/red] {shown(exc.message, multiline=True)}")
        raise typer.Exit(2) from exc
    except ShipyardError as exc:
        err.print(f"[red]build failed:[/red] {shown(exc.message, multiline=True)}")
        if log_path := exc.detail.get("log_path"):
            err.print(f"full log: {shown(str(log_path))}")
        raise typer.Exit(1) from exc
    if output is OutputFormat.json:
        out.print_json(json.dumps(_as_json(artifact)))
    else:
        out.print(_table(artifact))


async def _build(
    repository: str,
    branch: str | None,
    commit: str | None,
    config: BuildConfig,
    logs: Console | None,
    *,
    no_cache: bool,
) -> Artifact:
    if branch is None:
        branch = await default_branch(repository)
    if commit is None:
        commit = await branch_head(repository, branch, cache_dir=config.data_dir)
    source = SourceConfig(repository=repository, branch=branch, commit=commit)

    def sink(line: str) -> None:
        assert logs is not None
        logs.print(shown(line))

    return await build_source(
        BuildRequest(source=source, log_sink=sink if logs is not None else None, no_cache=no_cache),
        config,
    )


def _read_builders(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"--builders-config {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InvalidInput(f"--builders-config {path}: expected an object of objects per kind")
    return data


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}" for err in exc.errors()
    )


def _as_json(artifact: Artifact) -> dict[str, Any]:
    return {
        "digest": artifact.digest,
        "kind": artifact.kind,
        "location": artifact.location,
        "commit": artifact.commit,
        "tree": artifact.tree,
        "service": artifact.manifest.service.name,
        "builder": artifact.builder,
        "duration_ms": artifact.duration_ms,
        "build_time_target_ms": BUILD_TIME_TARGET_MS,
        "build_time_ok": artifact.build_time_ok,
        "cache": dataclasses.asdict(artifact.cache),
        "log_path": None if artifact.log_path is None else str(artifact.log_path),
    }


def _hit(value: bool | None) -> str:
    return "-" if value is None else ("hit" if value else "miss")


def _table(artifact: Artifact) -> Table:
    cache = artifact.cache
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("digest", shown(artifact.digest))
    table.add_row("artifact", f"{shown(artifact.kind)} {shown(artifact.location)}")
    table.add_row("commit", shown(artifact.commit))
    table.add_row("builder", shown(artifact.builder))
    if cache.no_cache:
        table.add_row("artifact cache", "not used (--no-cache)")
    elif cache.artifact_rejected is not None:
        table.add_row("artifact cache", f"rejected, rebuilt: {shown(cache.artifact_rejected)}")
    else:
        table.add_row("artifact cache", _hit(cache.artifact_hit))
    table.add_row("dependency cache", _hit(cache.dependencies_hit))
    if cache.layers_cached is not None:
        table.add_row("layer cache", f"{cache.layers_cached} cached, {cache.layers_built} built")
    verdict = "[green]within[/green]" if artifact.build_time_ok else "[red]over[/red]"
    table.add_row(
        "duration",
        f"{artifact.duration_ms} ms ({verdict} the {BUILD_TIME_TARGET_MS // 1000} s target)",
    )
    if artifact.log_path is not None:
        table.add_row("log", shown(str(artifact.log_path)))
    return table
