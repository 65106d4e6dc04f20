"""Two control-plane replicas and one joined agent, as real processes (issue 14, shared state):
``shipyard serve`` A and B with data directories of their own, one ``--shared-dir`` (keys, fleet
CA, artifacts, build logs) and one database, neither running a local agent. The agent joins
through A with both replicas' URLs (the join command ``shipyard region add`` prints names both);
B dials it (regions are in the database, its controller certificate comes from the shared CA);
with A stopped, B deploys to it -- building into the shared artifact store, from which the agent
fetches through B -- and the agent renews its certificate through B.

One SQLite file serves both replicas here (B's ``shipyard.db`` is a link to A's): the database
on PostgreSQL and the leases that decide who drives are the other branches' tests. A is stopped
before B deploys, so no second replica drives or reconciles meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.cli.demo import _git, make_example_repo
from tests.e2e.support import Server, wait_for_state, wait_until
from tests.fleet.support import (
    FleetServer,
    JoinedAgent,
    add_region,
    admin_client,
    deploy_body,
    fleet_server,
)

pytestmark = pytest.mark.e2e

#: Agent certificates live this long, so renewals come every ~14 s of the test.
CERT_TTL = "20"


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[FleetServer, FleetServer, Path]]:
    shared = tmp_path / "shared"
    started: list[FleetServer] = []
    args = ("--no-local-agent", "--fleet-cert-ttl", CERT_TTL)
    try:
        started.append(fleet_server(tmp_path / "a", *args, shared_dir=shared))
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "shipyard.db").symlink_to(tmp_path / "a" / "shipyard.db")
        started.append(fleet_server(tmp_path / "b", *args, shared_dir=shared))
        yield started[0], started[1], shared
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[JoinedAgent]:
    eu = JoinedAgent(tmp_path / "agent-eu", "127.0.0.2")
    yield eu
    eu.stop()


def _regions(server: FleetServer, admin: httpx.Client) -> dict[str, dict[str, Any]]:
    rows = admin.get(f"{server.base}/api/v1/regions").json()["regions"]
    return {r["name"]: r for r in rows}


def test_an_agent_joined_through_one_replica_is_driven_by_the_other(
    replicas: tuple[FleetServer, FleetServer, Path], agent: JoinedAgent, tmp_path: Path
) -> None:
    a, b, shared = replicas
    for server in (a, b):
        assert not (server.data_dir / "keys").exists() and not (server.data_dir / "agents").exists()
    command, token = add_region(a.data_dir, "eu", shared_dir=shared)
    assert f"--join {b.fleet_url} --join {a.fleet_url} --token {token}" in command

    agent.join([a.fleet_url, b.fleet_url], token)
    member = agent.member()
    assert member is not None and member["control_planes"] == [a.fleet_url, b.fleet_url]
    with admin_client(b) as admin:
        row = wait_for_state(
            lambda: _regions(b, admin).get("eu", {}),
            lambda r: r.get("cert_serial") == agent.serial(),
            30,
            "replica B to see the region joined through A",
        )
        assert row["agent_url"] == f"https://127.0.0.2:{member['port']}"
        # B dials the agent (its region sync reads the database every few seconds): a service
        # it does not know is a 404 from the agent, not the 422 of an unknown region.
        assert b.client is not None
        wait_until(
            lambda: (
                b.client is not None
                and b.client.get("/api/v1/services/hello", params={"region": "eu"}).status_code
                == 404
            ),
            30,
            "replica B to dial the agent",
        )

    a.stop()
    repo = make_example_repo(tmp_path / "hello-repo")
    body = deploy_body(repo, "eu")
    body["source"]["commit"] = _git(repo, "rev-parse", "HEAD")
    r = b.client.post("/api/v1/deploy", json=body)
    assert r.status_code == 202, r.text
    done = b.wait_final(r.json()["deployment_id"], timeout=180)
    assert done["status"] == "Success", done
    url = b.client.get("/api/v1/services/hello", params={"region": "eu"}).json()["url"]
    assert httpx.get(url, timeout=10).status_code == 200

    # Built into the shared store by B, fetched by the agent through B (A refuses connections).
    digests = [p.name for p in (shared / "artifacts").glob("sha256-*") if p.is_dir()]
    assert len(digests) == 1
    assert (agent.data_dir / "agents" / "eu" / "artifacts" / digests[0]).is_dir()
    assert not (b.data_dir / "artifacts").exists() and list((shared / "logs").iterdir())
    said = agent.log.read_text()
    assert f"the control plane answers at {b.fleet_url}" in said
    assert "fetched artifact" in said

    # Renewal through B: the agent's new certificate is the one B's database row names.
    wait_until(
        lambda: f"certificate renewed through {b.fleet_url}" in agent.log.read_text(),
        60,
        "a renewal through replica B",
    )
    with admin_client(b) as admin:
        wait_for_state(
            lambda: (_regions(b, admin)["eu"]["cert_serial"], agent.serial()),
            lambda pair: pair[0] == pair[1] and pair[0] != row["cert_serial"],
            30,
            "replica B to record the renewed certificate",
        )
    # B still dials the agent with its renewed certificate.
    assert b.client.get("/api/v1/services/hello", params={"region": "eu"}).status_code == 200


def test_a_local_agent_trusts_the_signing_key_in_the_shared_directory(tmp_path: Path) -> None:
    """``serve --shared-dir`` with its local agent (the SQLite default): the agent ``serve``
    starts verifies artifacts with ``<shared>/keys/signing.pub``, so a deployment succeeds
    with no key in the data directory (that workloads cannot see the shared directory is
    tests/sandbox's)."""
    shared = tmp_path / "shared"
    server = Server(tmp_path / "cp", shared_dir=shared)
    repo = make_example_repo(tmp_path / "hello-repo")
    try:
        server.start()
        done = server.wait_final(server.deploy(repo, _git(repo, "rev-parse", "HEAD")), 180)
        assert done["status"] == "Success", done
        assert (shared / "keys" / "signing.pub").is_file()
        assert not (server.data_dir / "keys").exists()
    finally:
        server.stop()
        server.stop_agent()
