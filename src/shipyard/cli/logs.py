"""``shipyard logs SERVICE``: what a service's replicas printed, from ``GET
/api/v1/services/{name}/logs`` (api/logs.py). Mounted by ``cli/main.py``
(``app.add_typer(logs_app)``)::

    shipyard logs SERVICE [--revision R] [--replica ID] [--tail N] [--since 10m|ISO-TIME]
                          [--follow] [--region R] [--format text|json]

Each line is printed as ``TIME REPLICA out|err TEXT`` (``--format json``: one JSON object per
line, as the API gives it). App output is untrusted text: it goes through ``cli/safe.py``
(control characters made visible, Rich markup escaped), one line at a time. ``--follow`` reads
the API's NDJSON stream and, when the server ends it (``Settings.log_follow_max_seconds``),
resumes from the cursor it was given, so the user sees one unbroken stream until Ctrl-C.

Exit codes: 0 (also after Ctrl-C while following), 1 the server failed or the stream broke,
2 bad input (tail, since, revision, replica: checked here before the server is asked, with the
same rules) or an unknown service, revision or replica.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from shipyard.cli.client import DEFAULT_SERVER
from shipyard.cli.safe import neutralised, shown
from shipyard.domain.log_queries import REPLICA_ID, REVISION, SINCE_HELP, parse_since
from shipyard.errors import InvalidInput
from shipyard.runtime.base import MAX_LOG_LINES

logs_app = typer.Typer(pretty_exceptions_enable=False)

# A long line stays one line when piped; ":name:" in app output stays text, not an emoji.
out = Console(soft_wrap=True, highlight=False, emoji=False)
err = Console(stderr=True)


@logs_app.command("logs")
def logs(
    service: Annotated[str, typer.Argument(help="Service name.")],
    revision: Annotated[str | None, typer.Option(help="Only this revision's replicas.")] = None,
    replica: Annotated[str | None, typer.Option(help="Only this replica (an id).")] = None,
    tail: Annotated[
        int, typer.Option(help=f"The last N lines (at most {MAX_LOG_LINES}); 0: none.")
    ] = 200,
    since: Annotated[str | None, typer.Option(help=f"Only lines since: {SINCE_HELP}.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
    region: str = "local",
    server: Annotated[
        str, typer.Option("--server", envvar="SHIPYARD_SERVER", help="API base URL.")
    ] = DEFAULT_SERVER,
    token: Annotated[
        str | None, typer.Option("--token", envvar="SHIPYARD_TOKEN", help="Bearer token.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Local server's data directory (mints a token).",
            envvar="SHIPYARD_DATA_DIR",
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="text or json (one object a line).")] = (
        "text"
    ),
) -> None:
    """What a service's replicas printed (stdout and stderr, a time on each line), also of
    replicas stopped since; --follow keeps printing new lines (Ctrl-C ends it)."""
    # main imports this module to mount it; its helpers are read when the command runs.
    from shipyard.cli import main as cli

    params = _params(revision, replica, tail, since, region, format)
    client = cli._client(server, token, data_dir, "deployment:read")
    path = f"/api/v1/services/{service}/logs"
    if not follow:
        doc = cli._check(client.request("GET", path, params=params))
        for line in doc["lines"]:
            _print(line, format)
        return
    params["follow"] = "true"
    try:
        while True:
            with client.stream("GET", path, params=params) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    cli._check(resp)
                end = _relay(resp.iter_lines(), format)
            # The server ends a follow after a while: go on from where it stopped.
            params = {k: v for k, v in params.items() if k not in ("tail", "since")}
            params["after"] = end
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _params(revision: str | None, replica: str | None, tail: int, since: str | None,
            region: str, format: str) -> dict[str, Any]:  # fmt: skip
    """The query, checked as the server checks it (a clear error before any request)."""
    from shipyard.cli.common import fail

    if format not in ("text", "json"):
        raise fail(f"--format must be text or json, got {format!r}")
    if not 0 <= tail <= MAX_LOG_LINES:
        raise fail(f"--tail must be between 0 and {MAX_LOG_LINES}, got {tail}")
    if revision is not None and not re.fullmatch(REVISION, revision):
        raise fail(f"--revision {revision!r} is not a revision name (letters, digits, . _ -)")
    if replica is not None and not re.fullmatch(REPLICA_ID, replica):
        raise fail(f"--replica {replica!r} is not a replica id (letters, digits, . _ -)")
    params: dict[str, Any] = {"tail": tail, "region": region}
    if since is not None:
        try:
            parse_since(since, 0.0)
        except InvalidInput as exc:
            raise fail(f"--since: {exc.message}") from exc
        params["since"] = since
    if revision is not None:
        params["revision"] = revision
    if replica is not None:
        params["replica"] = replica
    return params


def _relay(records: Any, format: str) -> str:
    """Print a follow stream's lines; the cursor of its end record. Fails (exit 1) on an error
    record or a stream that stops without one."""
    from shipyard.cli.common import fail

    for raw in records:
        if not raw:
            continue  # keep-alive
        record = json.loads(raw)
        kind = record.get("type")
        if kind == "line":
            _print({k: v for k, v in record.items() if k != "type"}, format)
        elif kind == "end":
            return str(record["cursor"])
        elif kind == "error":
            raise fail(f"the logs stream failed: {record.get('message')}", 1)
    raise fail("the server closed the logs stream; run the command again to go on", 1)


def _print(line: dict[str, Any], format: str) -> None:
    if format == "json":
        # json.dumps escapes every control character: nothing in it can act on a terminal.
        typer.echo(neutralised(json.dumps(line)))
        return
    stamp = _short_time(str(line["timestamp"]))
    stream = "[red]err[/red]" if line["stream"] == "stderr" else "[dim]out[/dim]"
    out.print(
        f"[dim]{shown(stamp)}[/dim] [cyan]{shown(line['replica_id'])}[/cyan] {stream} "
        f"{shown(line['text'])}"
    )


def _short_time(iso: str) -> str:
    """``2026-01-31T14:00:00.123456+00:00`` as ``2026-01-31T14:00:00.123Z``."""
    try:
        when = dt.datetime.fromisoformat(iso).astimezone(dt.UTC)
    except ValueError:
        return iso
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
