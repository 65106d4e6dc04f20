"""``shipyard status --watch`` (``cli/watch.py``): the view rendered from documents a real
server answered, the plain-line output when stdout is not a terminal, the loop's exit codes,
and ``promote``/``abort`` following from where the deployment is.

The documents in ``watch_docs/`` were recorded from ``shipyard serve`` and its agent running the
example app under wrk load (``tests/cli/record_watch_docs.py`` records them again): each holds
the deployment, its service, and ``at``, the time it was read (the render's "now").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from shipyard.cli import main, watch
from shipyard.cli.client import ApiClient
from shipyard.cli.watch import Snapshot

runner = CliRunner()
DOCS = Path(__file__).parent / "watch_docs"
HOSTILE = "[bold red]x[/bold red]\x1b[2J\u202e"
SEEN = "[bold red]x[/bold red]\\x1b[2J\\u202e"


def recorded(name: str) -> Any:
    return json.loads((DOCS / f"{name}.json").read_text())


def snapshot(doc: dict[str, Any]) -> Snapshot:
    return Snapshot(doc["deployment"], doc["service"])


def at(doc: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(doc["at"], UTC)


def shown(doc: dict[str, Any], width: int = 400) -> str:
    """The view as a terminal shows it (styles dropped), wide enough that nothing wraps."""
    console = Console(record=True, width=width, force_terminal=True, color_system=None)
    console.print(watch.render(snapshot(doc), at(doc)))
    return console.export_text()


def line_with(text: str, needle: str) -> str:
    [line] = [ln for ln in text.splitlines() if needle in ln]
    return line


def stage(doc: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [s for s in doc["deployment"]["stages"] if s["name"] == name]
    return dict(found)


def running_for(doc: dict[str, Any], name: str) -> str:
    """How long stage ``name`` had been running when ``doc`` was read, as the view says it."""
    started = datetime.fromisoformat(stage(doc, name)["started_at"])
    return watch.duration((at(doc) - started).total_seconds() * 1000)


# --- the view of each state ----------------------------------------------------------------------


def test_a_canary_under_analysis_shows_each_verdict_in_words() -> None:
    doc = recorded("canary_analysing")
    dep = doc["deployment"]
    text = shown(doc)
    analysis = stage(doc, "analysis_1")
    line = line_with(text, "◷ analysis_1")
    assert running_for(doc, "analysis_1") in line and "20%" in line and "for 3.0s" in line
    measurements = analysis["detail"]["measurements"]
    assert len(measurements) == 4
    for number, m in enumerate(measurements, start=1):
        verdict_line = line_with(text, f"#{number} {m['verdict']}:")
        assert f"{m['requests']} request" in verdict_line
        assert "(need 20)" in verdict_line  # the stage's min_requests, from the plan's policy
        assert f"success {m['success_rate'] * 100:.2f}%" in verdict_line
        assert f"p99 {m['p99_ms']:.1f} ms" in verdict_line
    insufficient = line_with(text, "insufficient_data:")
    assert "1 request (need 20)" in insufficient
    assert "1 responses < min_requests 20" in insufficient
    for pending in (
        "○ gate_1",
        "○ canary_2  50%",
        "○ analysis_2  50%  for 3.0s",
        "○ promote  100%",
    ):
        assert pending in text
    for done in ("✔ build", "✔ scan", "✔ start", "✔ health_check", "✔ canary_1"):
        assert done in text
    green, blue = dep["green_revision"], dep["blue_revision"]
    assert f"{green} (canary)  weight 20%" in text
    assert f"{blue} (stable)  weight 80%" in text
    for r in doc["service"]["replicas"]:
        assert f"{r['replica_id']}  running, ready, 0 restart(s)" in text
    assert f"next: in progress: `shipyard abort {dep['id']}` rolls it back now" in text
    assert watch.exit_code(dep) is None


def test_a_paused_canary_says_how_to_promote_or_abort() -> None:
    doc = recorded("canary_paused")
    dep = doc["deployment"]
    text = shown(doc)
    assert dep["status"] == "Paused"
    assert (
        f"next: paused (stage 1 gate): run `shipyard promote {dep['id']}` to go on or "
        f"`shipyard abort {dep['id']}` to roll back"
    ) in text
    assert running_for(doc, "gate_1") in line_with(text, "◷ gate_1")
    tallies = stage(doc, "analysis_1")["detail"]["tallies"]
    summary = line_with(text, "✔ analysis_1")
    assert "verdict pass" in summary
    assert f"({tallies['passed']} passed, 1 insufficient data, 1 extension(s))" in summary
    assert "○ canary_2" in text and "○ gate_1" not in text
    assert "#1 pass" not in text  # a passed analysis is its summary line, not its measurements
    assert watch.exit_code(dep) is None


def test_a_canary_failed_by_analysis_shows_the_verdict_the_rollback_and_the_error() -> None:
    doc = recorded("canary_rolled_back_sequence")[-1]
    dep = doc["deployment"]
    text = shown(doc)
    assert dep["status"] == "RolledBack"
    [m] = stage(doc, "analysis_1")["detail"]["measurements"]
    verdict = line_with(text, "#1 fail:")
    assert f"{m['requests']} requests (need 20), success {m['success_rate'] * 100:.2f}%" in verdict
    assert "success rate 0.7069 < min_success_rate 0.99" in verdict
    assert "✖ analysis_1" in text
    assert f"✔ rollback  {watch.duration(stage(doc, 'rollback')['duration_ms'])}" in text
    assert f"restored {dep['blue_revision']}" in text
    assert f"AnalysisFailed: {dep['error']['message']}" in text
    assert "○" not in text  # an ended deployment has nothing still to come
    assert f"{dep['blue_revision']} (stable)  weight 100%" in text
    assert f"hello serves {dep['blue_revision']}" in line_with(text, "next:")
    assert watch.exit_code(dep) == 1


def test_blue_green_baking() -> None:
    doc = recorded("blue_green_baking")
    dep = doc["deployment"]
    text = shown(doc)
    assert "BlueGreen  Baking" in text
    assert running_for(doc, "bake") in line_with(text, "◷ bake") and "for 2.0s" in text
    assert "✔ switch_delay" in text and "✔ switch  " in text and "○ scale_down" in text
    assert f"{dep['green_revision']} (new)  weight 100%" in text
    assert f"{dep['blue_revision']} (stable)  weight 0%" in text


def test_rolling_update_scaling_up_shows_unready_replicas() -> None:
    doc = recorded("rolling_scaling")
    dep = doc["deployment"]
    text = shown(doc)
    assert "◷ scale_up_2" in text and "to 2 replica(s)" in line_with(text, "◷ scale_up_2")
    assert "○ scale_down_0  to 0 replica(s)" in text
    new = [r for r in doc["service"]["replicas"] if r["revision"] == dep["green_revision"]]
    assert len(new) == 2
    for r in new:
        assert f"{r['replica_id']}  running, not ready, 0 restart(s)" in text


def test_success_exits_0_and_offers_the_rollback() -> None:
    for name in ("canary_success", "rolling_success"):
        doc = recorded(name)
        dep = doc["deployment"]
        assert watch.exit_code(dep) == 0
        assert f"`shipyard rollback {dep['id']}` puts {dep['blue_revision']} back" in shown(doc)


def test_a_manual_rollback_names_the_revision_it_restores() -> None:
    doc = recorded("rolling_success")
    done = doc["deployment"]
    # A rollback record of that deployment, as the API shows one: it restores the revision
    # that served before (its green) and replaces the one serving (its blue).
    rollback = {
        **done,
        "kind": "rollback",
        "strategy": {"Rollback": {"instant": True}},
        "green_revision": done["blue_revision"],
        "blue_revision": done["green_revision"],
        "rollback_of": done["id"],
        "stages": [],
        "progress": None,
        "status": "Switching",
    }
    text = shown({**doc, "deployment": rollback})
    assert f"{done['blue_revision']} (restored)" in text
    assert f"{done['green_revision']} (rolled back from)" in text
    assert "rollback " in line_with(text, "hello@local") and "Rollback  Switching" in text
    assert "next: in progress" in text and "shipyard abort" not in text


def test_a_service_with_nothing_in_flight() -> None:
    svc = recorded("rolling_success")["service"]
    console = Console(record=True, width=400, force_terminal=True, color_system=None)
    console.print(
        watch.render(Snapshot(None, {**svc, "active_deployment": None}), datetime.now(UTC))
    )
    text = console.export_text()
    assert f"hello@local  serving {svc['serving_revision']}" in text
    assert "no deployment in flight on hello; watching until Ctrl-C" in text
    assert "stages" not in text


def test_untrusted_text_is_shown_as_written() -> None:
    doc = recorded("canary_paused")
    dep = {**doc["deployment"], "service": f"web{HOSTILE}", "status": "Failed"}
    dep["error"] = {"type": f"Boom{HOSTILE}", "message": f"line one\n{HOSTILE}"}
    dep["stages"] = [
        {**s, "name": f"{s['name']}{HOSTILE}", "detail": {**s["detail"], "error": HOSTILE}}
        for s in dep["stages"]
    ]
    svc = {**doc["service"], "warnings": [f"careful {HOSTILE}"]}
    svc["replicas"] = [{**r, "replica_id": f"r{HOSTILE}"} for r in svc["replicas"]]
    text = shown({"deployment": dep, "service": svc, "at": doc["at"]})
    assert "\x1b" not in text and "\u202e" not in text
    assert f"web{SEEN}@local" in text
    assert f"build{SEEN}" in text
    assert f"Boom{SEEN}: line one\n" in text
    assert f"careful {SEEN}" in text
    assert f"r{SEEN}  running" in text
    plain = "\n".join(line for _, line in watch.facts(Snapshot(dep, svc)))
    assert "\x1b" not in plain and "\u202e" not in plain
    assert f"stage build{SEEN} succeeded" in plain


# --- the command: plain lines when stdout is not a terminal ---------------------------------------


def api(routes: dict[str, Callable[[httpx.Request], httpx.Response]]) -> type[ApiClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        return routes[request.url.path](request)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(handler))

    return MockedClient


def replay(docs: list[dict[str, Any]]) -> tuple[Callable[..., httpx.Response], ...]:
    """Route handlers answering the recorded deployment and service, one snapshot further at
    each read of the deployment (the service read that follows answers the same snapshot)."""
    state: dict[str, int] = {"i": -1}

    def deployment(_: httpx.Request) -> httpx.Response:
        state["i"] = min(state["i"] + 1, len(docs) - 1)
        return httpx.Response(200, json=docs[state["i"]]["deployment"])

    def service(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=docs[max(state["i"], 0)]["service"])

    return deployment, service


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(watch, "sleep", slept.append)
    return slept


def test_watch_without_a_terminal_prints_each_change_once_and_exits_1_on_rollback(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    docs = recorded("canary_rolled_back_sequence")
    dep_id = docs[0]["deployment"]["id"]
    deployment, service = replay(docs)
    routes = {f"/api/v1/deployments/{dep_id}": deployment, "/api/v1/services/hello": service}
    monkeypatch.setattr(main, "ApiClient", api(routes))
    result = runner.invoke(
        main.app, ["status", dep_id, "--watch", "--interval", "0.5", "--token", "t"]
    )
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "\x1b" not in out  # no cursor movement, no colour: plain lines
    assert "├──" not in out
    lines = out.splitlines()
    stages = [ln for ln in lines if ln.startswith(("stage ", "  analysis_1 #"))]
    assert len(stages) == len(set(stages)), "a stage line was printed twice"
    blue, green = docs[-1]["deployment"]["blue_revision"], docs[-1]["deployment"]["green_revision"]
    assert [ln for ln in lines if ln.startswith("weights ")] == [
        f"weights {blue} 100%",
        f"weights {green} 30%, {blue} 70%",
        f"weights {blue} 100%",
    ]  # printed when they changed, and only then
    statuses = [ln.split(": ", 1)[1] for ln in lines if ln.startswith(f"hello@local {dep_id}:")]
    assert statuses == ["Pending", "Building", "Scanning", "Deploying", "Analysing",
                        "RollingBack", "RolledBack"]  # fmt: skip
    assert "stage analysis_1 running  30%  for 20.0s" in lines
    assert any(ln.startswith("stage analysis_1 failed ") for ln in lines)
    assert any(ln.startswith("  analysis_1 #1 fail: 58 requests (need 20)") for ln in lines)
    canary = docs[-1]["deployment"]["green_revision"]
    stopped = [r for d in docs for r in d["service"]["replicas"] if r["revision"] == canary]
    assert f"replica {stopped[0]['replica_id']} removed" in lines
    took = watch.duration(docs[-1]["deployment"]["stages"][-1]["duration_ms"])
    assert lines.index("stage rollback running") < lines.index(
        f"stage rollback succeeded {took}  restored {blue}"
    )
    assert lines[-1].startswith("next: ended RolledBack")
    assert no_sleep == [0.5] * (len(docs) - 1)


def test_watching_a_service_follows_its_deployment_to_the_end(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    docs = recorded("canary_rolled_back_sequence")
    dep_id = docs[0]["deployment"]["id"]
    assert all(d["service"]["active_deployment"] == dep_id for d in docs[:-1])
    final = {**docs[-1]["service"], "active_deployment": None}
    services = iter([d["service"] for d in docs[:-1]] + [final])
    routes = {
        "/api/v1/services/hello": lambda _: httpx.Response(200, json=next(services)),
        f"/api/v1/deployments/{dep_id}": replay(docs)[0],
    }
    monkeypatch.setattr(main, "ApiClient", api(routes))
    result = runner.invoke(main.app, ["status", "hello", "--watch", "--token", "t"])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1].startswith("next: ended RolledBack")


def test_watch_refuses_json_output_before_asking_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(main, "ApiClient", api({}))  # any request would raise KeyError
    result = runner.invoke(
        main.app, ["status", "hello", "--watch", "--format", "json", "--token", "t"]
    )
    assert result.exit_code == 2
    assert "--watch draws a view" in result.stderr
    assert result.stdout == ""


def test_watch_of_an_unknown_deployment_is_an_error_before_anything_is_drawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dep_id = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"
    problem = {"error": "not_found", "detail": f"no deployment {dep_id}"}
    routes = {f"/api/v1/deployments/{dep_id}": lambda _: httpx.Response(404, json=problem)}
    monkeypatch.setattr(main, "ApiClient", api(routes))
    result = runner.invoke(main.app, ["status", dep_id, "--watch", "--token", "t"])
    assert result.exit_code == 2
    assert f"no deployment {dep_id}" in result.stderr
    assert result.stdout == ""


def test_a_server_that_stops_answering_mid_watch_is_said_and_retried() -> None:
    docs = recorded("canary_rolled_back_sequence")
    now: dict[str, Any] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        if now["doc"] is None:
            raise httpx.ConnectError("refused")
        key = "deployment" if "deployments" in request.url.path else "service"
        return httpx.Response(200, json=now["doc"][key])

    dep_id = docs[0]["deployment"]["id"]
    client = api({f"/api/v1/deployments/{dep_id}": answer, "/api/v1/services/hello": answer})
    poller = watch.Poller(client("http://x", "t"), dep_id, "local", is_id=True)
    seen = []
    for doc in (docs[0], None, docs[-1]):
        now["doc"] = doc
        seen.append(poller.poll())
    assert seen[0].problem is None
    assert seen[1].problem is not None and "cannot reach the Shipyard server" in seen[1].problem
    assert seen[1].deployment == docs[0]["deployment"]  # the last documents, still shown
    assert seen[2].problem is None and seen[2].deployment == docs[-1]["deployment"]


# --- the loop on a terminal ---------------------------------------------------------------------


def test_on_a_terminal_the_view_is_redrawn_until_the_end() -> None:
    docs = [recorded("canary_paused"), recorded("canary_success")]
    polls = iter(snapshot(d) for d in docs)
    console = Console(record=True, width=400, force_terminal=True, color_system=None)
    code = watch.run(
        lambda: next(polls),
        console,
        interval=1.0,
        live=True,
        pause=lambda _: None,
        clock=lambda: at(docs[-1]),
    )
    assert code == 0
    text = console.export_text()
    assert "Canary  Success" in text  # the last frame stays on the screen
    assert "\x1b[" not in text


def test_ctrl_c_stops_the_watch_cleanly() -> None:
    doc = recorded("canary_paused")
    calls = iter([snapshot(doc)])

    def poll() -> Snapshot:
        for snap in calls:
            return snap
        raise KeyboardInterrupt

    for live in (True, False):
        calls = iter([snapshot(doc)])
        console = Console(record=True, width=400, force_terminal=live, color_system=None)
        code = watch.run(poll, console, interval=1.0, live=live, pause=lambda _: None)
        assert code == watch.INTERRUPTED
        assert "stopped watching (the deployment goes on)" in console.export_text()


# --- promote / abort follow from where the deployment is ----------------------------------------

OLD_LOG = "OLD BUILD LINE from before the promotion"


def _promote_api(
    before: dict[str, Any], after: dict[str, Any], action: str
) -> tuple[type[ApiClient], list[int]]:
    """The deployment answers ``before`` until ``action`` is POSTed, then ``after``; the build
    log holds a line that must not be printed again. Returns the log offsets asked for."""
    dep_id = before["id"]
    acted: list[bool] = []
    offsets: list[int] = []

    def deployment(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=after if acted else before)

    def act(_: httpx.Request) -> httpx.Response:
        acted.append(True)
        return httpx.Response(202, json={"deployment_id": dep_id, "status": before["status"]})

    def logs(request: httpx.Request) -> httpx.Response:
        offset = int(request.url.params.get("offset", 0))
        offsets.append(offset)
        size = len(OLD_LOG) + 1
        text = f"{OLD_LOG}\n"[min(offset, size) :]
        return httpx.Response(200, json={"offset": max(min(offset, size), size), "text": text,
                                         "building": False})  # fmt: skip

    routes = {
        f"/api/v1/deployments/{dep_id}": deployment,
        f"/api/v1/deployments/{dep_id}/{action}": act,
        f"/api/v1/deployments/{dep_id}/logs": logs,
    }
    return api(routes), offsets


def test_promote_prints_only_what_happens_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    paused = recorded("canary_paused")["deployment"]
    done = recorded("canary_success")["deployment"]
    client, offsets = _promote_api(paused, done, "promote")
    monkeypatch.setattr(main, "ApiClient", client)
    result = runner.invoke(main.app, ["promote", paused["id"], "--token", "t"])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert OLD_LOG not in err and "build |" not in err
    assert offsets == []  # a deployment past its build has no log to follow
    printed = [
        ln.split()[1] for ln in err.splitlines() if ln.startswith("  ") and "status" not in ln
    ]
    already = {s["name"] for s in paused["stages"] if s["status"] != "running"}
    assert already.isdisjoint(printed), f"replayed {already & set(printed)}"
    assert {"gate_1", "canary_2", "analysis_2", "promote"} <= set(printed)
    assert "  status  Success" in err
    assert "Success: hello serves" in err


def test_abort_during_the_build_follows_the_log_from_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = recorded("canary_rolled_back_sequence")
    building = next(d["deployment"] for d in docs if d["deployment"]["status"] == "Building")
    rolled_back = docs[-1]["deployment"]
    client, offsets = _promote_api(building, rolled_back, "abort")
    monkeypatch.setattr(main, "ApiClient", client)
    result = runner.invoke(main.app, ["abort", building["id"], "--token", "t"])
    assert result.exit_code == 0, result.output  # the abort did what was asked
    assert OLD_LOG not in result.stderr
    assert offsets and offsets[0] > len(OLD_LOG)  # asked from the end, never from 0
    assert 0 not in offsets


def test_a_fleet_shows_each_region_and_the_switch_skew() -> None:
    doc = recorded("blue_green_baking")
    dep = doc["deployment"]
    dep["regions"] = ["eu", "us"]
    dep["fleet"] = {
        "regions": {
            "eu": {"state": "rolled_back", "url": "http://eu/hello"},
            "us": {"state": "unreachable", "error": "region us did not answer set_weight"},
        },
        "region_timeout_seconds": 30.0,
        "switches": [{"step": 3, "weights": {"x": 100}, "skew_ms": 12.5, "acks_ms": {}}],
    }
    text = shown(doc)
    assert "region eu: rolled_back" in text
    assert "region us: unreachable  (region us did not answer set_weight)" in text
    assert "switch skew: max 12.5 ms over 1 switch(es)" in text
    lines = dict(watch.facts(snapshot(doc)))
    assert lines["fleet:region us"].startswith("region us: unreachable")
    assert lines["fleet:switch skew"].startswith("switch skew: max 12.5 ms")
    # One region: nothing about fleets.
    assert watch.fleet_lines(recorded("blue_green_baking")["deployment"]) == []


def test_a_metric_measurement_shows_the_metric_its_value_and_why() -> None:
    """``[[analysis.metrics]]``: a provider's measurement is its metric and value, not the
    router's request counts; each metric's tallies are on the stage line."""
    view = watch.StageView(
        "analysis_1",
        "failed",
        {
            "verdict": None,
            "metrics": {"error-rate@us": {"passed": 2, "failed": 1, "errors": 0}},
        },
    )
    failed = {
        "verdict": "fail",
        "metric": "error-rate",
        "provider": "prometheus",
        "region": "us",
        "value": 0.3,
        "reasons": ["success_condition `result < 0.05` does not hold for result = 0.3"],
    }
    assert watch.measurement_text(view, 3, failed) == (
        "#3 fail: error-rate@us = 0.3 - success_condition `result < 0.05` does not hold for "
        "result = 0.3"
    )
    empty = {"verdict": "insufficient_data", "metric": "p99", "provider": "web", "value": None}
    assert watch.measurement_text(view, 1, {k: v for k, v in empty.items() if v is not None}) == (
        "#1 insufficient_data: p99 = no value"
    )
    assert "error-rate@us (2 passed, 1 failed)" in watch._stage_note(view)
