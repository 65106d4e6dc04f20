"""``shipyard demo``: the whole story on this machine, for real, in under a minute.

1. starts ``shipyard serve`` (which starts the region's agent) on a fresh data directory;
2. makes a git repository of the bundled example app and deploys v1;
3. deploys v2 blue-green while a load generator runs through the service URL: requests made,
   failed = 0;
4. deploys v3 as a canary under load: 20% then 50% of requests, each stage judged by analysis
   of the router's own metrics (success rate, p99), then promoted to 100%;
5. deploys a broken v4 (its health check starts failing during the bake window): it is rolled
   back automatically; reports how long detection and the rollback took;
6. waits until v2's warm window has ended and the agent no longer runs it, then rolls v3 back
   to v2 under load: a cold rollback (v2 restarted from its artifact, verified, health-gated,
   then switched); reports how long it took and that no request failed;
7. verifies the audit trail; stops everything it started.

``shipyard demo`` (``make demo``) runs it with the example app as processes. The story takes an
``Example`` -- how to make the repository and what else to show -- so ``shipyard demo
--containers`` (``cli/demo_containers.py``) tells the same story with an image service on Docker
Engine. The helpers that make the example repositories (``make_example_repo``,
``make_notes_repo``, ``commit_version``) are shared with the end-to-end tests (``tests/e2e``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from shipyard.audit import verify_database
from shipyard.cli.loadgen import LoadGenerator
from shipyard.cli.safe import shown
from shipyard.cli.token import issue_local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@shipyard.local",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@shipyard.local",
    }
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


#: The files of each bundled example (``shipyard/examples/<name>/``) that make its repository.
EXAMPLE_FILES = {
    "hello": ("app.py", "shipyard.toml", "version.txt"),
    "notes": ("app.py", "gunicorn.conf.py", "requirements.txt", "shipyard.toml", "version.txt"),
    "hello-container": (
        "Dockerfile",
        "shipyard.toml",
        "start.sh",
        "version.txt",
        "www/cgi-bin/index.cgi",
    ),
}


def _example_repo(example: str, path: Path, extra: Mapping[str, Path] | None = None) -> Path:
    """A git repository holding the bundled ``example`` at v1 on branch main, plus the files
    ``extra`` names (path in the repository -> file to copy). Executable bits are kept."""
    src = resources.files("shipyard.examples") / example
    path.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLE_FILES[example]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        with resources.as_file(src / name) as file:
            shutil.copy(file, path / name)
    for name, file in (extra or {}).items():
        shutil.copy(file, path / name)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "v1")
    return path


def make_example_repo(path: Path) -> Path:
    """A git repository holding the example app (stdlib ``hello``) at v1 on branch main."""
    return _example_repo("hello", path)


def make_notes_repo(path: Path) -> Path:
    """A git repository holding the Flask + gunicorn ``notes`` example at v1 on branch main
    (service ``notes``; its build installs flask and gunicorn from PyPI into ``.deps``)."""
    return _example_repo("notes", path)


def commit_version(
    repo: Path,
    version: str,
    *,
    unhealthy_after: float | None = None,
    error_rate: float | None = None,
    delay_ms: float | None = None,
    broken_region: str | None = None,
) -> str:
    """Commit ``version`` of an example app (hello or notes: both read these files); the
    keywords make it a bad release (see the examples' app.py)."""
    (repo / "version.txt").write_text(version + "\n")
    for name, value in (
        ("unhealthy_after.txt", unhealthy_after),
        ("error_rate.txt", error_rate),
        ("delay_ms.txt", delay_ms),
        ("broken_region.txt", broken_region),
    ):
        if value is None:
            (repo / name).unlink(missing_ok=True)
        else:
            (repo / name).write_text(f"{value}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", version)
    return _git(repo, "rev-parse", "HEAD")


def _stage_summary(stage: dict[str, Any]) -> str:
    """One line per finished stage; analysis stages show their verdicts."""
    detail = stage.get("detail") or {}
    line = f"{stage['name']}: {stage['status']}"
    if "candidate_weight" in detail and stage["name"].startswith(("canary", "promote")):
        line += f", canary weight {detail['candidate_weight']}% -> {detail.get('weights')}"
    elif "candidate_weight" in detail:  # a rollback's switch
        line += f" -> {detail.get('weights')}"
    measurements = detail.get("measurements") or []
    if measurements:
        verdicts = ", ".join(m["verdict"] for m in measurements)
        last = measurements[-1]
        rate = last.get("success_rate")
        line += (
            f", verdicts [{verdicts}] (last window: {last.get('requests')} requests, "
            f"success rate {rate if rate is None else round(rate, 4)}, "
            f"p99 {round(last.get('p99_ms') or 0, 1)} ms) -> {detail.get('verdict')}"
        )
    if detail.get("error"):
        line += f" ({detail['error']})"
    return line


def set_replicas(repo: Path, replicas: int) -> None:
    """Set ``[run] replicas`` in the example's shipyard.toml (committed with the next version)."""
    path = repo / "shipyard.toml"
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("replicas")]
    at = lines.index("[run]") + 1
    lines.insert(at, f"replicas = {replicas}")
    path.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class Example:
    """What the story deploys and how it is shown; ``run_demo`` tells the same story for each.

    ``make_repo(path)`` makes the git repository at v1 (``commit_version`` makes the next
    versions: every example reads the same files); ``env`` goes to ``shipyard serve`` (and so
    to its agent) on top of ours, e.g. ``DOCKER_HOST``; ``show(demo)`` is called after each
    deployment that changes what runs, to print what the runtime runs; ``unhealthy_after`` is
    when the broken release's health check starts failing, seconds after its start: past the
    health gate, inside the bake window (a container starts slower than a process);
    ``cleanup(demo)`` runs after everything was stopped, for what outlives the agent."""

    kind: str
    make_repo: Callable[[Path], Path]
    env: Mapping[str, str] = field(default_factory=dict)
    show: Callable[[Demo], None] | None = None
    unhealthy_after: float = 2.0
    cleanup: Callable[[Demo], None] | None = None


class Demo:
    def __init__(
        self,
        data_dir: Path,
        port: int,
        console: Console,
        env: Mapping[str, str] | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        #: More ``shipyard serve`` options (``--fleet-listen ...`` for ``shipyard demo --fleet``).
        self.serve_args = tuple(serve_args)
        self.port = port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.say = console.print
        self.env = dict(env or {})
        self.server: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start_server(self) -> None:
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115 - handed to the child
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shipyard.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
                # The demo's repositories sit beside its data directory, wherever --data-dir is.
                "--source-root",
                str(self.data_dir.parent),
                *self.serve_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        # Generous: on a shared, busy machine imports and the agent's start can take a while.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"shipyard serve exited; see {self.data_dir / 'serve.log'}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("shipyard serve did not answer within 90 s")
        token = issue_local(
            self.data_dir, "demo", ["deployment:create", "deployment:read", "deployment:rollback"]
        )
        self.client = httpx.Client(
            base_url=self.base, headers={"authorization": f"Bearer {token}"}, timeout=120
        )

    def deploy(
        self, repo: Path, commit: str, *, bake: float, switch_delay: int = 0
    ) -> dict[str, Any]:
        strategy = {
            "BlueGreen": {
                "switch_delay_seconds": switch_delay,
                "bake_seconds": bake,
                "scale_down_delay_seconds": 2,
            }
        }
        return self.deploy_with(repo, commit, strategy)

    def deploy_with(
        self, repo: Path, commit: str, strategy: dict[str, Any], *, show_stages: bool = False
    ) -> dict[str, Any]:
        """Deploy with any strategy and follow it (``follow``)."""
        assert self.client is not None
        body = {
            "source": {"repository": str(repo), "branch": "main", "commit": commit},
            "target": {"service_name": "hello", "region": "local"},
            "strategy": strategy,
        }
        r = self.client.post("/api/v1/deploy", json=body)
        r.raise_for_status()
        return self.follow(r.json()["deployment_id"], show_stages=show_stages)

    def rollback(self, deployment_id: str) -> dict[str, Any]:
        """``POST /api/v1/rollback/{id}`` and follow the rollback to its end."""
        assert self.client is not None
        r = self.client.post(f"/api/v1/rollback/{deployment_id}")
        r.raise_for_status()
        return self.follow(r.json()["deployment_id"], show_stages=True)

    def running_revisions(self) -> set[str]:
        """The revisions the agent runs replicas of (``GET /api/v1/services/hello``)."""
        assert self.client is not None
        svc = self.client.get("/api/v1/services/hello").json()
        return {r["revision"] for r in svc["replicas"]}

    def follow(self, dep_id: str, *, show_stages: bool) -> dict[str, Any]:
        """Print each status (and, if asked, each finished stage) until the end; the document."""
        assert self.client is not None
        last = ""
        printed: set[tuple[int, str]] = set()
        while True:
            doc: dict[str, Any] = self.client.get(f"/api/v1/deployments/{dep_id}").json()
            if doc["status"] != last:
                last = doc["status"]
                self.say(f"    {shown(last)}")
            for i, st in enumerate(doc["stages"] if show_stages else []):
                if st["status"] != "running" and (i, st["status"]) not in printed:
                    printed.add((i, st["status"]))
                    self.say(f"      {shown(_stage_summary(st), multiline=True)}")
            if doc["status"] in ("Success", "Failed", "RolledBack"):
                return doc
            time.sleep(0.1)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
        info = self.data_dir / "agents" / "local" / "agent.json"
        if info.exists():
            import json

            pid = int(json.loads(info.read_text())["pid"])
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except ProcessLookupError:
                pass


#: ``make demo``'s example: the stdlib ``hello`` app, run as sandboxed processes.
PROCESSES = Example("processes", make_example_repo)


def run_demo(
    data_dir: Path | None, port: int, console: Console, example: Example = PROCESSES
) -> int:
    """The story (module docstring) with ``example``; 0 when every step met its goal."""
    say = console.print
    t_start = time.monotonic()
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="shipyard-demo-")) if own_dir else data_dir
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    demo = Demo(root / "data", port, console, example.env)
    show = example.show or (lambda _demo: None)
    demo.data_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        say(
            f"[bold]1.[/bold] starting shipyard serve on {shown(demo.base)} "
            f"(data: {shown(demo.data_dir)})"
        )
        demo.start_server()
        repo = example.make_repo(root / "hello-repo")
        v1 = _git(repo, "rev-parse", "HEAD")
        say(f"[bold]2.[/bold] deploying v1 ({v1[:10]}), the service's first deployment")
        d1 = demo.deploy(repo, v1, bake=0)
        if d1["status"] != "Success":
            say(f"[red]v1 did not deploy: {shown(d1.get('error'))}[/red]")
            return 1
        url = d1["result"]["url"]
        say(f"    hello is live at {shown(url)}: {shown(repr(httpx.get(url).text.strip()))}")
        show(demo)

        v2 = commit_version(repo, "v2")
        say(f"[bold]3.[/bold] deploying v2 ({v2[:10]}) blue-green under steady load")
        load = LoadGenerator(url, connections=8).start()
        time.sleep(1.0)
        d2 = demo.deploy(repo, v2, bake=2, switch_delay=1)
        time.sleep(1.0)
        report = load.stop()
        say(
            f"    v2: {shown(d2['status'])}; load: {report.requests} requests made, "
            f"[{'green' if report.failed == 0 else 'red'}]{report.failed} failed[/]"
            f"{' ' + shown(dict(report.reasons)) if report.failed else ''}; served by "
            f"{shown(dict(report.served_by))}"
        )
        ok &= d2["status"] == "Success" and report.failed == 0
        show(demo)

        v3 = commit_version(repo, "v3")
        say(
            f"[bold]4.[/bold] deploying v3 ({v3[:10]}) as a canary under load: 20% then 50%, "
            "each stage judged on the router's metrics (success rate >= 99%, p99 <= 250 ms)"
        )
        analysis = {
            "interval_seconds": 1,
            "min_requests": 20,
            "min_success_rate": 0.99,
            "max_p99_latency_ms": 250,
        }
        load = LoadGenerator(url, connections=8).start()
        time.sleep(0.5)
        dc = demo.deploy_with(
            repo,
            v3,
            {
                "Canary": {
                    "stages": [
                        {"weight": 20, "duration_seconds": 3, "analysis": analysis},
                        {"weight": 50, "duration_seconds": 3, "analysis": analysis},
                    ],
                    "scale_down_delay_seconds": 2,
                }
            },
            show_stages=True,
        )
        report = load.stop()
        say(
            f"    v3: {shown(dc['status'])} (promoted to 100%); load: {report.requests} "
            f"requests, [{'green' if report.failed == 0 else 'red'}]{report.failed} failed[/]; "
            f"the service answers {shown(repr(httpx.get(url).text.strip()))}"
        )
        ok &= dc["status"] == "Success" and report.failed == 0
        show(demo)

        v4 = commit_version(repo, "v4", unhealthy_after=example.unhealthy_after)
        say(
            f"[bold]5.[/bold] deploying a broken v4 ({v4[:10]}): "
            f"its health check fails {example.unhealthy_after:g} s after start"
        )
        d3 = demo.deploy(repo, v4, bake=10)
        m = d3["metrics"]
        err = (d3.get("error") or {}).get("message", "")
        say(f"    v4: {shown(d3['status'])} — {shown(err, multiline=True)}")
        say(
            "    unhealthy verdict -> 100% of traffic back on v3: "
            f"{shown(m.get('detection_to_rollback_ms'))} ms "
            f"(rollback stage {shown(m.get('rollback_duration_ms'))} ms; ADR target 30 000 ms)"
        )
        now_serving = httpx.get(url).text.strip()
        say(f"    the service answers: {shown(repr(now_serving))}")
        ok &= d3["status"] == "RolledBack" and "v3" in now_serving

        v2_revision = d2["green_revision"]
        say(
            "[bold]6.[/bold] cold rollback: once v2's warm window has ended and the agent no "
            "longer runs it, roll v3 back to v2 under load (restarted from its artifact, "
            "verified and health-gated before it takes traffic)"
        )
        waited = time.monotonic()
        while v2_revision in demo.running_revisions():
            if time.monotonic() - waited > 30:
                raise RuntimeError(f"v2 ({v2_revision}) still runs 30 s after its window ended")
            time.sleep(0.2)
        say(
            "    v2 is no longer running; the service runs "
            f"{shown(sorted(demo.running_revisions()))}"
        )
        load = LoadGenerator(url, connections=8).start()
        time.sleep(0.5)
        asked = time.monotonic()
        rb = demo.rollback(dc["id"])
        took_ms = int((time.monotonic() - asked) * 1000)
        time.sleep(0.5)
        report = load.stop()
        instant = rb["strategy"].get("Rollback", {}).get("instant")
        now_serving = httpx.get(url).text.strip()
        say(
            f"    rollback: {shown(rb['status'])} ({'instant' if instant else 'cold'}) in "
            f"{took_ms} ms (rollback stage {shown(rb['metrics'].get('rollback_duration_ms'))} "
            f"ms); load: {report.requests} requests, "
            f"[{'green' if report.failed == 0 else 'red'}]{report.failed} failed[/]"
            f"{' ' + shown(dict(report.reasons)) if report.failed else ''}"
            f"; the service answers {shown(repr(now_serving))}"
        )
        if rb.get("error"):
            say(f"    [red]{shown(rb['error'].get('message'), multiline=True)}[/red]")
        show(demo)
        ok &= (
            rb["status"] == "Success"
            and instant is False
            and report.failed == 0
            and "v2" in now_serving
        )

        say("[bold]7.[/bold] verifying the audit trail")
        result = verify_database(demo.data_dir / "shipyard.db", demo.data_dir / "audit.head")
        say(
            f"    {'intact' if result.ok else 'TAMPERED'}: {result.records} hash-chained records"
            + ("" if result.ok else f" (first bad: {result.first_bad_seq}: {shown(result.reason)})")
        )
        ok &= result.ok
    except Exception as exc:
        say(f"[red]demo failed: {shown(repr(exc), multiline=True)}[/red]")
        ok = False
    finally:
        demo.stop()
        if example.cleanup is not None:
            example.cleanup(demo)
        if own_dir and ok:
            shutil.rmtree(root, ignore_errors=True)
    say(
        f"demo ({example.kind}) {'[green]passed[/green]' if ok else '[red]FAILED[/red]'} "
        f"in {time.monotonic() - t_start:.1f} s"
    )
    return 0 if ok else 1
