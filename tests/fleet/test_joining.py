"""Remote regions end to end, with real processes and real TLS: ``shipyard serve
--fleet-listen`` and ``shipyard agent --join`` on 127.0.0.2 as separate processes, the join,
a deployment to the joined region, the refusals (expired and reused tokens, a removed region, a
certificate of another CA, plain HTTP), and renewal while clients keep using the service and
the control plane keeps dialing the agent.

Directory artifacts reach the agent through the shared filesystem: the agent runs on the same
machine and reads the artifact where the control plane stored it (fetching over the fleet
listener is helper ARTIFACTS' part).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.cli.demo import _git, make_example_repo
from shipyard.security import pki
from tests.e2e.support import wait_for_state, wait_until
from tests.fleet.support import (
    FleetServer,
    JoinedAgent,
    add_region,
    admin_client,
    deploy_body,
    fleet_server,
    shipyard,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_example_repo(tmp_path / "hello-repo")


@pytest.fixture
def agents() -> Iterator[list[JoinedAgent]]:
    started: list[JoinedAgent] = []
    yield started
    for agent in started:
        agent.stop()


def _server(tmp_path: Path, *extra: str) -> Iterator[FleetServer]:
    server = fleet_server(tmp_path / "cp", *extra)
    try:
        yield server
    finally:
        server.stop()
        server.stop_agent()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[FleetServer]:
    yield from _server(tmp_path)


def _joined(admin: httpx.Client, region: str) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = wait_for_state(
        lambda: {r["name"]: r for r in admin.get("/api/v1/regions").json()["regions"]},
        lambda rows: bool(rows.get(region, {}).get("joined_at")),
        60,
        f"region {region} to join",
    )
    return rows[region]


def _deploy(cp: FleetServer, repo: Path, region: str) -> dict[str, Any]:
    assert cp.client is not None
    body = deploy_body(repo, region)
    body["source"]["commit"] = _git(repo, "rev-parse", "HEAD")
    r = cp.client.post("/api/v1/deploy", json=body)
    assert r.status_code == 202, r.text
    return cp.wait_final(r.json()["deployment_id"], timeout=180)


def _tls_refused(url: str, context: ssl.SSLContext | bool, **kw: Any) -> None:
    """A request over TLS that must fail before any HTTP answer."""
    with pytest.raises(httpx.TransportError), httpx.Client(verify=context, timeout=10) as c:
        c.get(url, **kw)


@pytest.fixture
def admin(cp: FleetServer) -> Iterator[httpx.Client]:
    with admin_client(cp) as client:
        yield client


def test_join_deploy_then_refusals(
    cp: FleetServer, admin: httpx.Client, repo: Path, agents: list[JoinedAgent], tmp_path: Path
) -> None:
    command, token = add_region(cp.data_dir, "eu")
    assert f"--join {cp.fleet_url} --token {token}" in command
    eu = JoinedAgent(tmp_path / "agent-eu", "127.0.0.2")
    agents.append(eu)
    eu.join(cp.fleet_url, token)
    row = _joined(admin, "eu")
    member = eu.member()
    assert member is not None and member["region"] == "eu"
    assert row["agent_url"] == f"https://127.0.0.2:{member['port']}"
    assert row["cert_serial"] == eu.serial()
    for name in ("agent.pem",):
        assert (eu.data_dir / "identity" / name).stat().st_mode & 0o077 == 0

    # A deployment to the joined region: the CP dials the agent over mTLS.
    done = _deploy(cp, repo, "eu")
    assert done["status"] == "Success", done
    assert cp.client is not None
    svc = cp.client.get("/api/v1/services/hello", params={"region": "eu"}).json()
    url = svc["url"]
    low, high = eu.port_range
    assert url.startswith("http://127.0.0.2:") and low <= int(url.rsplit(":", 1)[1]) <= high
    assert httpx.get(url, timeout=10).status_code == 200

    # Plain HTTP to the agent's API and to the fleet listener: no answer.
    agent_api = row["agent_url"]
    with pytest.raises(httpx.TransportError):
        httpx.get(agent_api.replace("https://", "http://") + "/v1/health", timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(cp.fleet_url.replace("https://", "http://") + "/fleet/v1/ca", timeout=10)
    fleet_ca = eu.data_dir / "identity" / "fleet-ca.crt"
    # The agent's API refuses a client without the controller's certificate: its own
    # certificate (fleet CA) included.
    own = pki.agent_client_context(fleet_ca, eu.pem, eu.pem)
    _tls_refused(f"{agent_api}/v1/health", own, extensions={"sni_hostname": "eu.region.shipyard"})
    # A certificate of another CA at the fleet listener: refused at the handshake.
    (tmp_path / "stranger").mkdir(mode=0o700)
    stranger = pki.FleetPki(tmp_path / "stranger" / "fleet")
    key = pki.new_key()
    forged = tmp_path / "stranger" / "eu.pem"
    forged.write_bytes(
        stranger.issue_agent(pki.make_csr(key, "eu"), "eu", 600).pem + pki.key_pem(key)
    )
    _tls_refused(
        f"{cp.fleet_url}/fleet/v1/ca",
        pki.agent_client_context(fleet_ca, forged, forged),
    )

    # Restarted with only its data directory: same identity, address and service.
    member = eu.member()
    eu.stop()
    eu.start()
    eu.wait_up()
    assert eu.member() == member
    wait_until(
        lambda: (
            cp.client is not None
            and cp.client.get("/api/v1/services/hello", params={"region": "eu"}).status_code == 200
        ),
        60,
        "the CP to reach the restarted agent",
    )
    # Its replicas are started again (processes die with their agent): the same URL serves.
    wait_until(lambda: _status(url) == 200, 60, "the service to answer after the restart")
    assert eu.serial() == row["cert_serial"]  # its stored certificate, still valid

    # The token is used: a second agent with it is refused, and stores nothing.
    thief = JoinedAgent(tmp_path / "agent-thief", "127.0.0.3")
    agents.append(thief)
    proc = thief.start("--join", cp.fleet_url, "--token", token, "--listen", "127.0.0.3:0")
    assert proc.wait(120) == 2
    assert "already used" in _said(thief)
    assert thief.member() is None and not thief.pem.exists()

    # An expired token is refused.
    _, late = add_region(cp.data_dir, "us", ttl=1)
    created = next(r for r in admin.get("/api/v1/regions").json()["regions"] if r["name"] == "us")
    assert created["agent_url"] is None
    wait_until(lambda: _age(created["created_at"]) > 1.5, 30, "the join token to expire")
    us = JoinedAgent(tmp_path / "agent-us", "127.0.0.3")
    agents.append(us)
    assert (
        us.start("--join", cp.fleet_url, "--token", late, "--listen", "127.0.0.3:0").wait(120) == 2
    )
    assert "token of region us expired" in _said(us)

    # Removing the region: refused renewals, and the CP no longer dials it.
    assert admin.delete("/api/v1/regions/eu").status_code == 200
    client = pki.agent_client_context(fleet_ca, eu.pem, eu.pem)
    body = {"csr": pki.make_csr(pki.new_key(), "eu").decode(), "agent_url": agent_api}
    refused = httpx.post(f"{cp.fleet_url}/fleet/v1/renew", json=body, verify=client, timeout=10)
    assert refused.status_code == 403 and refused.json()["reason"] == "region_removed"
    gone = cp.client.get("/api/v1/services/hello", params={"region": "eu"})
    assert gone.status_code == 422 and "unknown region" in gone.text
    # The agent serves on without its control plane.
    assert httpx.get(url, timeout=10).status_code == 200


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.TransportError:
        return None


def _said(agent: JoinedAgent) -> str:
    """The agent's output, its lines joined (the terminal wraps long messages)."""
    return " ".join(agent.log.read_text().split())


def _age(iso: str) -> float:
    from datetime import datetime

    return time.time() - datetime.fromisoformat(iso).timestamp()


class Poller(threading.Thread):
    """GETs ``target()`` back to back until stopped; counts answers and failures."""

    def __init__(self, target: Any) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                status = self.target()
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"status {status}")


@pytest.fixture
def short_lived_cp(tmp_path: Path) -> Iterator[FleetServer]:
    yield from _server(tmp_path, "--fleet-cert-ttl", "6")


def test_renewal_without_a_failed_request_and_restart(
    short_lived_cp: FleetServer,
    repo: Path,
    agents: list[JoinedAgent],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    cp = short_lived_cp
    admin = admin_client(cp)
    request.addfinalizer(admin.close)
    _, token = add_region(cp.data_dir, "eu")
    eu = JoinedAgent(tmp_path / "agent-eu", "127.0.0.2")
    agents.append(eu)
    eu.join(cp.fleet_url, token)
    _joined(admin, "eu")
    assert _deploy(cp, repo, "eu")["status"] == "Success"
    assert cp.client is not None
    url = cp.client.get("/api/v1/services/hello", params={"region": "eu"}).json()["url"]

    service = Poller(lambda: httpx.get(url, timeout=10).status_code)
    # Every control call dials the agent anew over mTLS: GET .../services/hello?region=eu.
    dialer = httpx.Client(base_url=cp.base, headers=admin.headers, timeout=30)
    control = Poller(
        lambda: dialer.get("/api/v1/services/hello", params={"region": "eu"}).status_code
    )
    first = eu.serial()
    service.start()
    control.start()
    try:
        seen = {first}

        # Two renewals: the second is signed while the first renewed certificate serves.
        def renewed_twice() -> bool:
            seen.add(eu.serial())
            return len(seen) >= 3

        wait_until(renewed_twice, 60, "two certificate renewals")
        # The CP records each renewed certificate as the region's current one.
        wait_for_state(
            lambda: (
                admin.get("/api/v1/regions").json()["regions"][0]["cert_serial"],
                eu.serial(),
            ),
            lambda pair: pair[0] == pair[1] and pair[0] != first,
            30,
            "the CP to record the agent's current certificate",
        )
        before = control.ok
        wait_until(lambda: control.ok > before + 5, 60, "control calls after the renewals")
    finally:
        service.halt.set()
        control.halt.set()
        service.join()
        control.join()
        dialer.close()
    assert service.failures == [] and service.ok > 0
    assert control.failures == [] and control.ok > 0
    assert "certificate renewed" in eu.log.read_text()

    # Without its control plane the agent serves on and retries renewal with backoff.
    cp.stop()
    wait_until(lambda: "certificate renewal failed" in eu.log.read_text(), 60, "a failed renewal")
    assert httpx.get(url, timeout=10).status_code == 200
    # Past its certificate's end it says how to come back, and its services still answer.
    wait_until(lambda: "certificate of region eu expired" in _said(eu), 60, "the expiry notice")
    assert httpx.get(url, timeout=10).status_code == 200

    # Coming back as the notice says: the region removed and added, the agent joined again
    # with the new token; it keeps its services (same URL) and the CP dials it again.
    cp.start()
    shipyard("region", "remove", "eu", "--data-dir", str(cp.data_dir))
    _, again = add_region(cp.data_dir, "eu")
    eu.stop()
    eu.join(cp.fleet_url, again)
    renewed = _joined(admin, "eu")
    assert renewed["cert_serial"] == eu.serial() and renewed["cert_serial"] not in seen
    wait_until(
        lambda: (
            cp.client is not None
            and cp.client.get("/api/v1/services/hello", params={"region": "eu"}).json().get("url")
            == url
        ),
        60,
        "the CP to reach the re-joined agent",
    )
    wait_until(lambda: _status(url) == 200, 60, "the service to answer after the re-join")
