"""``shipyard demo --fleet`` (``make demo-fleet``): one deployment across three regions in
lockstep, on this machine, for real. Called by ``cli.main.demo``.

1. starts ``shipyard serve`` with a fleet listener (``--fleet-listen 127.0.0.1:PORT``) on a fresh
   data directory;
2. adds regions eu-west, us-east and ap-south (``shipyard region add``: its last stdout line is
   the join token) and starts one ``shipyard agent --join`` per region, each with its own data
   directory, listening on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (Linux routes all of 127/8 to
   ``lo``): three data planes joined over mutual TLS, from outside ``serve``;
3. deploys the bundled ``hello`` example to all three at once (``target.regions``) and prints
   each region's URL and answer;
4. deploys v2 blue-green while a load generator polls every region's URL: prints failed
   requests, when each region started answering v2 (seen from outside), the skew between the
   first and the last, and the skew the control plane recorded (``switch_skew_ms``);
5. deploys a v3 that is broken in us-east only (the app reads ``SHIPYARD_REGION``): the fleet
   rolls every region back to v2 and the deployment ends RolledBack naming us-east;
6. stops everything it started.

``add_region``, ``start_agent`` and ``outside_skew`` are shared with the end-to-end harness
(``tests/e2e/fleet.py``) and the fleet benchmark (``bench/bench_fleet.py``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from shipyard.cli.demo import Demo, _free_port, _git, commit_version, make_example_repo
from shipyard.cli.loadgen import LoadGenerator, LoadReport
from shipyard.cli.safe import shown
from shipyard.cli.token import issue_local

REGIONS = ("eu-west", "us-east", "ap-south")
#: The region where v3 is broken.
BROKEN = "us-east"
#: The demo's own API token: deploy, read, roll back, and list the regions.
PERMISSIONS = ["deployment:create", "deployment:read", "deployment:rollback", "region:admin"]
TERMINAL = ("Success", "Failed", "RolledBack")
#: How long a process of ours may take to come up on a busy machine before the demo gives up.
START_BOUND_S = 120.0


def agent_host(index: int) -> str:
    """The loopback address of the ``index``-th agent (0-based): 127.0.0.2, 127.0.0.3, ..."""
    if not 0 <= index < 250:
        raise ValueError(f"no loopback address for agent {index}")
    return f"127.0.0.{index + 2}"


def free_port_on(host: str) -> int:
    """A port free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def add_region(data_dir: Path, region: str) -> str:
    """``shipyard region add REGION --data-dir DIR`` as a user runs it; the join token it prints
    on its last stdout line. RuntimeError with its stderr when it fails."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shipyard.cli.main",
            "region",
            "add",
            region,
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=START_BOUND_S,
    )
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"shipyard region add {region} failed: {done.stderr[-2000:]}")
    return lines[-1]


def start_agent(
    fleet_url: str, token: str, data_dir: Path, listen: str, log: Path
) -> subprocess.Popen[bytes]:
    """``shipyard agent --join FLEET_URL --token TOKEN --data-dir DIR --listen HOST:PORT`` in the
    background, its output appended to ``log``; not waiting for it to answer."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shipyard.cli.main",
                "agent",
                "--join",
                fleet_url,
                "--token",
                token,
                "--data-dir",
                str(data_dir),
                "--listen",
                listen,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def outside_skew(
    reports: Mapping[str, LoadReport], revision: str
) -> tuple[dict[str, float], float | None]:
    """When each region's URL first answered with ``revision`` (wall clock, from the load
    generators' ``first_seen``) and the skew between the first and the last region, in ms
    (None unless every region answered with it)."""
    seen = {
        region: min(t for rev, t in report.first_seen.items() if rev and revision.startswith(rev))
        for region, report in reports.items()
        if any(rev and revision.startswith(rev) for rev in report.first_seen)
    }
    if len(seen) < len(reports):
        return seen, None
    return seen, (max(seen.values()) - min(seen.values())) * 1000


class FleetDemo:
    """``shipyard serve --fleet-listen`` (``demo``, a ``cli.demo.Demo``) plus joined agents."""

    def __init__(self, root: Path, port: int, console: Console) -> None:
        self.root = root
        self.fleet_port = _free_port()
        self.fleet_url = f"https://127.0.0.1:{self.fleet_port}"
        self.demo = Demo(
            root / "data",
            port,
            console,
            serve_args=("--fleet-listen", f"127.0.0.1:{self.fleet_port}"),
        )
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.client: httpx.Client | None = None

    def start(self) -> None:
        self.demo.data_dir.mkdir(parents=True, exist_ok=True)
        self.demo.start_server()
        token = issue_local(self.demo.data_dir, "demo-fleet", PERMISSIONS)
        self.client = httpx.Client(
            base_url=self.demo.base, headers={"authorization": f"Bearer {token}"}, timeout=120
        )

    def join(self, region: str, host: str) -> str:
        """Add ``region``, start its agent on ``host`` and wait until the control plane lists
        it; the agent's API address."""
        token = add_region(self.demo.data_dir, region)
        listen = f"{host}:{free_port_on(host)}"
        log = self.root / f"agent-{region}.log"
        proc = start_agent(self.fleet_url, token, self.root / "agents" / region, listen, log)
        self.agents[region] = proc
        deadline = time.monotonic() + START_BOUND_S
        port = int(listen.rsplit(":", 1)[1])
        while not (listening(host, port) and region in self.regions() and self.dials(region)):
            if proc.poll() is not None:
                raise RuntimeError(f"the agent of {region} exited; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent of {region} did not join within {START_BOUND_S} s")
            time.sleep(0.2)
        return listen

    def regions(self) -> set[str]:
        """The regions whose agent has joined (``GET /api/v1/regions``)."""
        assert self.client is not None
        r = self.client.get("/api/v1/regions")
        r.raise_for_status()
        return {str(i["name"]) for i in r.json()["regions"] if i.get("joined_at")}

    def dials(self, region: str) -> bool:
        """Whether the server has a runtime for ``region`` yet (it syncs with the registry every
        few seconds): its service API does not call the region unknown."""
        assert self.client is not None
        r = self.client.get("/api/v1/services/hello", params={"region": region})
        return "unknown_region" not in r.text

    def deploy(
        self, repo: Path, commit: str, strategy: dict[str, Any], regions: Sequence[str] = REGIONS
    ) -> dict[str, Any]:
        """Deploy ``commit`` to ``regions`` in lockstep and follow it to its end."""
        assert self.client is not None
        r = self.client.post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": "hello", "regions": list(regions)},
                "strategy": strategy,
            },
        )
        r.raise_for_status()
        dep_id = r.json()["deployment_id"]
        last = ""
        while True:
            doc: dict[str, Any] = self.client.get(f"/api/v1/deployments/{dep_id}").json()
            if doc["status"] != last:
                last = doc["status"]
                self.demo.say(f"    {shown(last)}")
            if last in TERMINAL:
                return doc
            time.sleep(0.1)

    def service(self, region: str) -> dict[str, Any]:
        """``GET /api/v1/services/hello?region=REGION``."""
        assert self.client is not None
        r = self.client.get("/api/v1/services/hello", params={"region": region})
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def stop(self) -> None:
        """Every agent (SIGTERM: each drains and stops its replicas), then serve."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.client is not None:
            self.client.close()
        self.demo.stop()


def _blue_green(bake: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": bake,
            "scale_down_delay_seconds": 2,
        }
    }


def run_fleet_demo(data_dir: Path | None, port: int, console: Console) -> int:
    """The story (module docstring); 0 when every step met its goal."""
    say = console.print
    t_start = time.monotonic()
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="shipyard-demo-fleet-")) if own_dir else data_dir
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    fleet = FleetDemo(root, port, console)
    ok = True
    try:
        say(
            f"[bold]1.[/bold] starting shipyard serve on {shown(fleet.demo.base)} with a fleet "
            f"listener on {shown(fleet.fleet_url)} (data: {shown(fleet.demo.data_dir)})"
        )
        fleet.start()
        say("[bold]2.[/bold] joining three regions, each agent its own process and address")
        for i, region in enumerate(REGIONS):
            listen = fleet.join(region, agent_host(i))
            say(f"    {region}: agent joined over mutual TLS, API on {shown(listen)}")

        repo = make_example_repo(root / "hello-repo")
        v1 = _git(repo, "rev-parse", "HEAD")
        say(f"[bold]3.[/bold] deploying v1 ({v1[:10]}) to {', '.join(REGIONS)} at once")
        d1 = fleet.deploy(repo, v1, _blue_green(0))
        if d1["status"] != "Success":
            say(f"[red]v1 did not deploy: {shown(d1.get('error'), multiline=True)}[/red]")
            return 1
        urls = {region: str(fleet.service(region)["url"]) for region in REGIONS}
        for region, url in urls.items():
            answer = httpx.get(url, timeout=10).text.strip()
            say(f"    {region}: {shown(url)} answers {shown(repr(answer))}")

        v2 = commit_version(repo, "v2")
        say(
            f"[bold]4.[/bold] deploying v2 ({v2[:10]}) blue-green to the fleet, every region's "
            "URL polled continuously"
        )
        loads = {region: LoadGenerator(url, connections=2).start() for region, url in urls.items()}
        time.sleep(1.0)
        d2 = fleet.deploy(repo, v2, _blue_green(1))
        time.sleep(1.0)
        reports = {region: load.stop() for region, load in loads.items()}
        failed = sum(r.failed for r in reports.values())
        requests = sum(r.requests for r in reports.values())
        say(
            f"    v2: {shown(d2['status'])}; {requests} requests over three regions, "
            f"[{'green' if failed == 0 else 'red'}]{failed} failed[/]"
        )
        seen, skew = outside_skew(reports, str(d2.get("green_revision") or ""))
        first = min(seen.values(), default=0.0)
        for region in REGIONS:
            at = seen.get(region)
            when = f"+{(at - first) * 1000:.1f} ms" if at is not None else "never"
            say(f"    {region}: {shown(urls[region])} answered v2 first at {when}")
        recorded = (d2.get("result") or {}).get("switch_skew_ms")
        say(
            f"    switch skew seen from outside: {'-' if skew is None else f'{skew:.1f}'} ms; "
            f"recorded by the control plane (switch_skew_ms): {shown(recorded)} ms "
            "(goal 100 ms, ADR bound 5 000 ms)"
        )
        ok &= d2["status"] == "Success" and failed == 0 and skew is not None

        v3 = commit_version(repo, "v3", broken_region=BROKEN)
        say(f"[bold]5.[/bold] deploying v3 ({v3[:10]}), broken in {BROKEN} only")
        d3 = fleet.deploy(repo, v3, _blue_green(2))
        err = str((d3.get("error") or {}).get("message", ""))
        say(f"    v3: {shown(d3['status'])} — {shown(err, multiline=True)}")
        answers = {region: httpx.get(url, timeout=10).text.strip() for region, url in urls.items()}
        for region, answer in answers.items():
            say(f"    {region} answers {shown(repr(answer))}")
        ok &= (
            d3["status"] == "RolledBack"
            and BROKEN in err
            and all(a == "hello from v2" for a in answers.values())
        )
    except Exception as exc:
        say(f"[red]demo failed: {shown(repr(exc), multiline=True)}[/red]")
        ok = False
    finally:
        fleet.stop()
        if own_dir and ok:
            shutil.rmtree(root, ignore_errors=True)
    say(
        f"demo (fleet) {'[green]passed[/green]' if ok else '[red]FAILED[/red]'} "
        f"in {time.monotonic() - t_start:.1f} s"
    )
    return 0 if ok else 1
