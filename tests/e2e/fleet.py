"""A fleet on this machine for the end-to-end tests, the fleet benchmark and ``shipyard demo
--fleet``'s checks: ``shipyard serve`` with a fleet listener, N regions added with the CLI
(``shipyard region add``, whose last stdout line is the join token), and N ``shipyard agent
--join ...`` processes started from outside ``serve``, each with its own data directory, its API
on its own loopback address (127.0.0.2, 127.0.0.3, ...; Linux routes all of 127/8 to ``lo``
with no setup) and its services on that address too.

``Fleet.stop()`` stops everything it started: any agent it SIGSTOPped is SIGCONTed first (a
stopped process cannot act on SIGTERM), every agent gets SIGTERM (it drains and stops its
replicas), and whatever survives -- an agent that did not exit, replicas of an agent that was
killed -- gets SIGKILL. Used by ``tests/e2e/test_fleet.py`` and ``bench/bench_fleet.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.demo_fleet import add_region, agent_host, free_port_on, start_agent
from shipyard.cli.token import issue_local
from tests.e2e.support import (
    API_LIMITS,
    STARTUP_BOUND,
    Server,
    run_cli,
    wait_for_state,
    wait_until,
)

#: What the harness's own API token may do: deploy, read, roll back, and manage regions.
FLEET_PERMISSIONS = [
    "deployment:create",
    "deployment:read",
    "deployment:rollback",
    "region:admin",
]
TERMINAL = ("Success", "Failed", "RolledBack")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (its replicas, their children), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Agent:
    """One ``shipyard agent --join`` process and where it lives."""

    region: str
    host: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    #: Processes seen below the agent (replicas): killed at the end if they outlive it.
    seen_children: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"agent-{self.region}.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def sigstop(self) -> None:
        """Freeze the agent (its API and its routers stop answering; replicas keep running):
        a partition as the control plane sees it."""
        assert self.proc is not None
        self.stopped = True
        self.proc.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self) -> None:
        """SIGCONT if stopped, then SIGTERM (the agent drains and stops its replicas); not
        waiting: ``reap`` does, so several agents stop at once."""
        if self.proc is None:
            return
        if self.stopped:
            self.sigcont()
        self.seen_children |= _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()

    def reap(self) -> None:
        """Wait for the agent to exit (SIGKILL after 30 s), then SIGKILL any replica of it
        still alive."""
        if self.proc is None:
            return
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.seen_children |= _descendants(self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)
        for child in self.seen_children:  # replicas of an agent that did not stop them
            _signal(child, signal.SIGKILL)


class Fleet:
    """``shipyard serve --fleet-listen`` plus ``len(regions)`` joined agents (module docstring).

    ``start()`` brings it all up (and stops whatever it started if any part fails);
    ``client`` is an API client with ``FLEET_PERMISSIONS``; ``agents[region]`` each agent.
    """

    def __init__(
        self,
        root: Path,
        regions: Sequence[str],
        *,
        cert_ttl: float | None = None,
    ) -> None:
        self.root = root
        self.regions = list(regions)
        self.fleet_port = free_port_on("127.0.0.1")
        self.fleet_url = f"https://127.0.0.1:{self.fleet_port}"
        extra = ["--fleet-listen", f"127.0.0.1:{self.fleet_port}"]
        if cert_ttl is not None:
            extra += ["--fleet-cert-ttl", str(int(cert_ttl))]
        self.server = Server(root / "data", *extra)
        self.agents: dict[str, Agent] = {}
        self.client: httpx.Client | None = None

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    # --- bringing it up ---------------------------------------------------------------------

    def start(self) -> Fleet:
        try:
            self.server.start()
            token = issue_local(
                self.data_dir, "e2e-fleet", FLEET_PERMISSIONS, ttl_seconds=12 * 3600
            )
            self.client = httpx.Client(
                base_url=self.server.base,
                timeout=60,
                headers={"authorization": f"Bearer {token}"},
                limits=API_LIMITS,
            )
            # `shipyard region add` is a process of its own (a second or more to import on a
            # busy machine): the regions are added side by side, then the agents start.
            with ThreadPoolExecutor(len(self.regions) or 1) as pool:
                tokens = list(pool.map(lambda r: add_region(self.data_dir, r), self.regions))
            for i, (region, token) in enumerate(zip(self.regions, tokens, strict=True)):
                self.join(region, agent_host(i), token)
            for agent in self.agents.values():
                self.wait_joined(agent)
        except BaseException:
            self.stop()
            raise
        return self

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``shipyard ARGS`` (the CLI as a user runs it) against this fleet's data directory."""
        env = {"SHIPYARD_SERVER": self.server.base}
        return run_cli(*args, env=env, timeout=STARTUP_BOUND, check=check)

    def join(self, region: str, host: str, token: str | None = None) -> Agent:
        """Start ``region``'s agent on ``host`` with ``token`` (default: add the region now);
        not waiting for it to answer (``wait_joined``)."""
        token = token or add_region(self.data_dir, region)
        agent = Agent(region, host, free_port_on(host), self.root / "agents" / region)
        self.agents[region] = agent
        agent.proc = start_agent(self.fleet_url, token, agent.data_dir, agent.address, agent.log)
        return agent

    def wait_joined(self, agent: Agent) -> None:
        """Until the control plane lists the region as joined and the agent's API answers
        ``/v1/health`` over mutual TLS to the control plane's own client certificate: ready to
        be driven (its listening socket alone is bound before it has joined)."""
        wait_until(
            lambda: agent.region in self.joined_regions(),
            STARTUP_BOUND,
            f"the control plane to list region {agent.region} as joined",
            interval=0.2,
        )
        wait_until(
            lambda: self.agent_health(agent) is not None,
            STARTUP_BOUND,
            f"agent {agent.region} to answer /v1/health over mTLS",
            interval=0.2,
        )
        wait_until(
            lambda: self.serves_region(agent.region),
            STARTUP_BOUND,
            f"the server to dial region {agent.region}",
            interval=0.2,
        )

    def serves_region(self, region: str) -> bool:
        """Whether the running server has a runtime for ``region`` (its registry sync runs
        every few seconds, so a region joined or removed shows there a moment later): the
        service API does not call it unknown."""
        assert self.client is not None
        r = self.client.get("/api/v1/services/fleet-probe", params={"region": region})
        return "unknown_region" not in r.text

    def controller_tls(self) -> ssl.SSLContext:
        """What the control plane presents to agents: its client certificate (``<data>/fleet/
        controller.crt``), trusting the fleet CA (by CA; agents are named
        ``<region>.region.shipyard``, not by address)."""
        pki = self.data_dir / "fleet"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(pki / "controller.crt"), str(pki / "controller.key"))
        return ctx

    def agent_health(self, agent: Agent) -> dict[str, Any] | None:
        """The agent's ``/v1/health`` document over mTLS, or None while it does not answer."""
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(
                f"agent {agent.region} exited with {agent.proc.returncode}: {agent.log_tail()}"
            )
        try:
            r = httpx.get(
                f"https://{agent.address}/v1/health", verify=self.controller_tls(), timeout=5
            )
        except (httpx.HTTPError, OSError):
            return None
        if r.status_code != 200:
            return None
        doc: dict[str, Any] = r.json()
        return doc

    def regions_listed(self) -> dict[str, dict[str, Any]]:
        """``GET /api/v1/regions``: every registered region, by name."""
        assert self.client is not None
        r = self.client.get("/api/v1/regions")
        assert r.status_code == 200, r.text
        return {str(item["name"]): item for item in r.json()["regions"]}

    def region_names(self) -> set[str]:
        """Every region registered (joined or not)."""
        return set(self.regions_listed())

    def joined_regions(self) -> set[str]:
        """The registered regions whose agent has joined."""
        return {name for name, item in self.regions_listed().items() if item.get("joined_at")}

    # --- deploying --------------------------------------------------------------------------

    def deploy(
        self,
        repo: Path,
        commit: str,
        service: str,
        strategy: dict[str, Any],
        regions: Sequence[str] | None = None,
    ) -> str:
        """Submit a deployment of ``commit`` to ``regions`` (default: all) in lockstep."""
        assert self.client is not None
        r = self.client.post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": service, "regions": list(regions or self.regions)},
                "strategy": strategy,
            },
        )
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])

    def deployment(self, dep_id: str) -> dict[str, Any]:
        assert self.client is not None
        r = self.client.get(f"/api/v1/deployments/{dep_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def wait_final(self, dep_id: str, timeout: float = 180) -> dict[str, Any]:
        """The deployment's document once it has ended (every status it went through is
        in ``seen_statuses`` of the answer)."""
        seen: list[str] = []

        def observe() -> dict[str, Any]:
            doc = self.deployment(dep_id)
            if not seen or seen[-1] != doc["status"]:
                seen.append(doc["status"])
            return doc

        doc = wait_for_state(
            observe, lambda d: d["status"] in TERMINAL, timeout, f"deployment {dep_id} to end"
        )
        return {**doc, "seen_statuses": seen}

    def wait_status(self, dep_id: str, statuses: Sequence[str], timeout: float = 180) -> str:
        """Until the deployment is in one of ``statuses`` (fails at once if it ends first)."""

        def observe() -> str:
            doc = self.deployment(dep_id)
            status = str(doc["status"])
            if status in TERMINAL and status not in statuses:
                raise AssertionError(
                    f"deployment {dep_id} ended {status} before {statuses}: {doc.get('error')}"
                )
            return status

        return wait_for_state(
            observe, lambda s: s in statuses, timeout, f"deployment {dep_id} to reach {statuses}"
        )

    def service(self, service: str, region: str) -> dict[str, Any]:
        """``GET /api/v1/services/{service}?region=REGION``."""
        assert self.client is not None
        r = self.client.get(f"/api/v1/services/{service}", params={"region": region})
        assert r.status_code == 200, f"{service} in {region}: {r.status_code} {r.text}"
        doc: dict[str, Any] = r.json()
        return doc

    def urls(self, service: str) -> dict[str, str]:
        """Each region's URL of ``service`` (the control plane's answer, per region)."""
        return {region: str(self.service(service, region)["url"]) for region in self.regions}

    # --- tearing down -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every agent at once (SIGCONT first where stopped), then serve and its local
        agent."""
        errors: list[BaseException] = []
        for step in (Agent.terminate, Agent.reap):
            for agent in self.agents.values():
                try:
                    step(agent)
                except BaseException as exc:  # keep stopping the others
                    errors.append(exc)
        if self.client is not None:
            self.client.close()
        self.server.stop()
        self.server.stop_agent()
        if errors:
            raise errors[0]


def region_states(doc: dict[str, Any]) -> dict[str, str]:
    """Each region's state in a fleet deployment's document (``fleet.regions``: pending,
    deploying, switched, rolled_back, unreachable, converged); {} when it has none."""
    regions = (doc.get("fleet") or {}).get("regions") or {}
    return {str(name): str(item["state"]) for name, item in regions.items()}
