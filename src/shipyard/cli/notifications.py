"""``shipyard notifications``: the server's notification sinks, through the API (permission
``notifications:admin``). Mounted by cli/main.py; the server side is api/notifications.py.

    shipyard notifications list
    shipyard notifications add NAME --type webhook --url URL [--events E,E] [--max-attempts N]
    shipyard notifications add NAME --type slack [--events E,E]
    shipyard notifications rm NAME
    shipyard notifications test NAME

A credential (a webhook's HMAC key, a Slack incoming-webhook URL) never goes on the command
line, where ``ps`` and shell history would keep it: it is read from standard input (one line,
the trailing newline stripped) or from the variable ``--value-env`` names. ``notification_lines``
is ``shipyard status``'s view of a deployment's deliveries.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from shipyard.cli.client import DEFAULT_SERVER
from shipyard.cli.common import OptDataDir, Server, Token, fail
from shipyard.cli.safe import console, shown
from shipyard.notify.events import EVENTS

notifications_app = typer.Typer(
    name="notifications",
    help="Notification sinks: webhooks and Slack (list, add, rm, test).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

PERMISSION = "notifications:admin"

out = console()
err = console(stderr=True)


def _client(server: str, token: str | None, data_dir: Path | None) -> Any:
    from shipyard.cli import main  # main mounts this module: import it when a command runs

    return main._client(server, token, data_dir, PERMISSION)


def _check(resp: Any) -> Any:
    from shipyard.cli import main

    return main._check(resp)


@notifications_app.command("list")
def list_sinks(
    server: Server = DEFAULT_SERVER, token: Token = None, data_dir: OptDataDir = None
) -> None:
    """Every sink: name, type, URL (a Slack one redacted), events and where it came from."""
    sinks = _check(_client(server, token, data_dir).request("GET", "/api/v1/notifications/sinks"))
    if not sinks["sinks"]:
        err.print("no notification sinks: add one with `shipyard notifications add`")
    for s in sinks["sinks"]:
        events = ",".join(s["events"]) or "all events"
        out.print(
            f"[bold]{shown(s['name'])}[/bold] {shown(s['type'])} {shown(s['url'])} "
            f"({shown(events)}; up to {shown(s['max_attempts'])} attempts; {shown(s['source'])})"
        )


def _credential(kind: str, value_env: str | None) -> str:
    what = "HMAC secret" if kind == "webhook" else "incoming webhook URL"
    if value_env is not None:
        value = os.environ.get(value_env)
        if not value:
            raise fail(f"--value-env {value_env}: that variable is not set (or empty)")
        return value
    if sys.stdin.isatty():
        raise fail(
            f"the {what} is read from standard input (or --value-env VAR); pipe it in, e.g. "
            f'`printf %s "$VALUE" | shipyard notifications add ...`'
        )
    value = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not value:
        raise fail(f"the {what} read from standard input is empty")
    return value


@notifications_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The sink's name (a DNS label).")],
    kind: Annotated[
        Literal["webhook", "slack"], typer.Option("--type", help="webhook or slack.")
    ] = "webhook",
    url: Annotated[
        str | None, typer.Option(help="webhook: where to POST (slack: the URL is the secret).")
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(help="Comma-separated events (default: all): " + ", ".join(EVENTS)),
    ] = None,
    max_attempts: Annotated[int, typer.Option(min=1, max=100, help="Attempts per event.")] = 12,
    value_env: Annotated[
        str | None,
        typer.Option(
            help="Read the credential (webhook secret, Slack URL) from this environment "
            "variable instead of standard input."
        ),
    ] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Add a sink. Its credential (a webhook's HMAC secret, a Slack URL) comes from standard
    input or --value-env; it is stored sealed and never shown again."""
    body: dict[str, Any] = {
        "name": name,
        "type": kind,
        "max_attempts": max_attempts,
        "events": [e.strip() for e in (events or "").split(",") if e.strip()],
    }
    if kind == "webhook":
        if url is None:
            raise fail("a webhook sink needs --url")
        body["url"] = url
        body["secret"] = _credential(kind, value_env)
    else:
        if url is not None:
            raise fail(
                "a Slack sink's URL is a credential: give it on standard input or with "
                "--value-env, not --url"
            )
        body["url"] = _credential(kind, value_env)
    client = _client(server, token, data_dir)
    added = _check(client.request("POST", "/api/v1/notifications/sinks", json=body))
    err.print(f"added sink [bold]{shown(added['name'])}[/bold] ({shown(added['type'])})")


@notifications_app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(help="The sink to remove.")],
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Remove a sink (its notifications not delivered yet fail)."""
    client = _client(server, token, data_dir)
    _check(client.request("DELETE", f"/api/v1/notifications/sinks/{name}"))
    err.print(f"removed sink [bold]{shown(name)}[/bold]")


@notifications_app.command("test")
def try_sink(
    name: Annotated[str, typer.Argument(help="The sink to send a test notification to.")],
    server: Server = DEFAULT_SERVER,
    token: Token = None,
    data_dir: OptDataDir = None,
) -> None:
    """Send one test notification now; exit 1 if the sink did not answer 2xx."""
    client = _client(server, token, data_dir)
    done = _check(client.request("POST", f"/api/v1/notifications/sinks/{name}/test"))
    if not done["delivered"]:
        err.print(f"[red]not delivered[/red] to {shown(name)}: {shown(done['error'])}")
        raise typer.Exit(1)
    err.print(f"delivered a test notification to [bold]{shown(name)}[/bold]")


def notification_lines(doc: dict[str, Any]) -> list[str]:
    """``shipyard status ID``: one line per notification of the deployment."""
    lines = []
    for n in doc.get("notifications") or []:
        line = f"notify {n['sink']} {n['event']}: {n['state']} ({n['attempts']} attempt(s))"
        if n.get("last_error") and n["state"] != "delivered":
            line += f", last error {n['last_error']}"
        lines.append(line)
    return lines
