"""Several control-plane replicas on one PostgreSQL, on this machine, for the HA end-to-end test
(``tests/e2e/test_ha.py``) and the HA benchmark (``bench/bench_ha.py``).

``HAStack.start()`` brings up, in this order:

- a PostgreSQL cluster of its own (``tests/postgres.own_postgres``: initdb + pg_ctl into a
  temporary directory, a free loopback port) and one database in it;
- ``shipyard serve`` replicas (``Replica``), each with its own data directory and the same
  ``--database postgresql://...``, ``--shared-dir`` (keys, the fleet CA, artifacts, build logs),
  a ``--replica-id`` of its own (``replica-a``, ``replica-b``, ...), ``--no-local-agent`` and a
  fleet listener of its own (``--fleet-listen``). The first one starts alone: it runs the
  migrations and makes the cluster's keys and CA in the shared directory; the others then start
  side by side;
- one region (``shipyard region add`` from the CLI, against the database and the shared
  directory) and its agent, ``shipyard agent --join URL_A --join URL_B ...``, on 127.0.0.2 (its
  services listen there too), joined through the first replica that answers.

Every replica answers the API with the same token (``shipyard token create`` from the CLI).
``kill9(replica)`` and ``restart(replica)`` are what the tests do to the control plane;
``driver(dep)`` says which replica drives a deployment (``GET /api/v1/deployments/{id}``'s
``driver``). ``stop()`` stops the agent (and its replicas), every replica, then PostgreSQL.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.demo_fleet import agent_host, free_port_on
from tests.e2e.fleet import FLEET_PERMISSIONS, TERMINAL, Agent
from tests.e2e.support import STARTUP_BOUND, Server, run_cli, wait_for_state, wait_until
from tests.postgres import PostgresServer, own_postgres

#: The region the stack's agent serves: long enough never to appear in a message by accident.
REGION = "ha-region-one"
#: What the stack's API token may do: deploy, read, roll back, promote, manage regions.
HA_PERMISSIONS = [*FLEET_PERMISSIONS]


def replica_names(count: int) -> list[str]:
    """``replica-a``, ``replica-b``, ... (``--replica-id`` of each replica)."""
    return [f"replica-{chr(ord('a') + i)}" for i in range(count)]


class Replica(Server):
    """One ``shipyard serve`` replica of an ``HAStack`` (its flags: the module docstring)."""

    def __init__(self, stack: HAStack, name: str, *extra: str) -> None:
        self.stack = stack
        self.name = name
        self.fleet_port = free_port_on("127.0.0.1")
        self.fleet_url = f"https://127.0.0.1:{self.fleet_port}"
        super().__init__(
            stack.root / name,
            "--database",
            stack.database,
            "--shared-dir",
            str(stack.shared_dir),
            "--replica-id",
            name,
            "--no-local-agent",
            "--fleet-listen",
            f"127.0.0.1:{self.fleet_port}",
            *extra,
        )

    def issue_token(self) -> str:
        return self.stack.api_token()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.data_dir / "serve.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class HAStack:
    """PostgreSQL, ``replicas`` ``shipyard serve`` replicas and one joined agent (module
    docstring). ``serve_args``: more ``shipyard serve`` options for every replica."""

    def __init__(self, root: Path, replicas: int = 2, serve_args: Sequence[str] = ()) -> None:
        self.root = root
        self.shared_dir = root / "shared"
        self.database = ""
        self.postgres: PostgresServer | None = None
        self._closing = contextlib.ExitStack()
        self._token: str | None = None
        self.serve_args = tuple(serve_args)
        self.names = replica_names(replicas)
        self.replicas: dict[str, Replica] = {}
        self.agent: Agent | None = None

    # --- bringing it up ---------------------------------------------------------------------

    def start(self) -> HAStack:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.shared_dir.mkdir(parents=True, exist_ok=True)
            self.postgres = self._closing.enter_context(own_postgres())
            # As a user writes it: the server normalises postgresql:// to its driver.
            self.database = self.postgres.create_database("shipyard").replace(
                "postgresql+psycopg://", "postgresql://", 1
            )
            self.replicas = {name: Replica(self, name, *self.serve_args) for name in self.names}
            first, *others = self.replicas.values()
            first.start()  # migrations, keys and the fleet CA: made once, by the first
            with ThreadPoolExecutor(len(others) + 1) as pool:  # each start takes seconds
                started = [pool.submit(replica.start) for replica in others]
                join_token = self.add_region()
                for future in started:
                    future.result()
            self.join_agent(join_token)
        except BaseException:
            self.stop()
            raise
        return self

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``shipyard ARGS`` as a user runs it (the store and keys flags are the caller's)."""
        return run_cli(*args, timeout=STARTUP_BOUND, check=check)

    def store_args(self, replica: str | None = None) -> list[str]:
        """``--database URL --shared-dir DIR --data-dir DIR`` (of ``replica``, default the
        first): what every store-reading command is given."""
        data_dir = self.replicas[replica or self.names[0]].data_dir
        return [
            "--database",
            self.database,
            "--shared-dir",
            str(self.shared_dir),
            "--data-dir",
            str(data_dir),
        ]

    def api_token(self) -> str:
        """One token every replica accepts (``shipyard token create``, issued once)."""
        if self._token is None:
            done = self.cli(
                "token",
                "create",
                *self.store_args(),
                "--subject",
                "e2e-ha",
                *(arg for p in HA_PERMISSIONS for arg in ("--permission", p)),
                "--ttl-seconds",
                str(12 * 3600),
            )
            self._token = done.stdout.strip().splitlines()[-1]
        return self._token

    def add_region(self) -> str:
        """``shipyard region add REGION``; the join token it prints (its last line)."""
        added = self.cli("region", "add", REGION, *self.store_args())
        return added.stdout.strip().splitlines()[-1]

    def join_agent(self, token: str) -> Agent:
        """The region's agent, joined with ``token`` and every replica's fleet URL (``--join``
        once per replica); waits until every replica dials it."""
        host = agent_host(0)
        agent = Agent(REGION, host, free_port_on(host), self.root / "agents" / REGION)
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        joins = [arg for r in self.replicas.values() for arg in ("--join", r.fleet_url)]
        with open(agent.log, "ab") as out:
            agent.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", *joins,
                 "--token", token, "--data-dir", str(agent.data_dir),
                 "--listen", agent.address],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.agent = agent
        first = self.replicas[self.names[0]]
        wait_until(
            lambda: REGION in self.joined_regions(first),
            STARTUP_BOUND,
            f"region {REGION} to be listed as joined",
            interval=0.2,
        )
        for replica in self.replicas.values():
            wait_until(
                lambda replica=replica: self.serves_region(replica),
                STARTUP_BOUND,
                f"{replica.name} to dial region {REGION}",
                interval=0.2,
            )
        return agent

    def joined_regions(self, replica: Replica) -> set[str]:
        assert self.agent is not None
        if self.agent.proc is not None and self.agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited: {self.agent.log_tail()}")
        r = self.client(replica).get("/api/v1/regions")
        assert r.status_code == 200, r.text
        return {str(i["name"]) for i in r.json()["regions"] if i.get("joined_at")}

    def serves_region(self, replica: Replica) -> bool:
        """Whether ``replica`` has a runtime for the region (it syncs regions every few s)."""
        r = self.client(replica).get("/api/v1/services/ha-probe", params={"region": REGION})
        return "unknown_region" not in r.text

    # --- the control plane, as the tests treat it ---------------------------------------------

    def client(self, replica: Replica) -> httpx.Client:
        assert replica.client is not None, f"{replica.name} is not running"
        return replica.client

    def live(self, but: Replica | None = None) -> Replica:
        """A running replica (not ``but``)."""
        for replica in self.replicas.values():
            if replica is not but and replica.alive:
                return replica
        raise AssertionError("no replica is running")

    def other(self, replica: Replica) -> Replica:
        """The next replica after ``replica`` (the one that should take over from it)."""
        names = self.names
        return self.replicas[names[(names.index(replica.name) + 1) % len(names)]]

    def kill9(self, replica: Replica) -> float:
        """``kill -9`` the replica; returns when it died (``time.monotonic()``)."""
        replica.kill9()
        return time.monotonic()

    def restart(self, replica: Replica) -> None:
        """Start a killed replica again (same data directory, replica id and ports)."""
        replica.start()

    # --- deploying ----------------------------------------------------------------------------

    def submit(
        self, replica: Replica, repo: Path, commit: str, service: str, strategy: dict[str, Any]
    ) -> httpx.Response:
        """``POST /api/v1/deploy`` to ``replica``: the raw answer (202, 409, ...)."""
        return self.client(replica).post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": service, "region": REGION},
                "strategy": strategy,
            },
        )

    def deploy(
        self, replica: Replica, repo: Path, commit: str, service: str, strategy: dict[str, Any]
    ) -> str:
        r = self.submit(replica, repo, commit, service, strategy)
        assert r.status_code == 202, f"{replica.name}: {r.status_code} {r.text}"
        return str(r.json()["deployment_id"])

    def deployment(self, dep_id: str, replica: Replica | None = None) -> dict[str, Any]:
        """``GET /api/v1/deployments/{id}`` from ``replica`` (default: any running one)."""
        r = self.client(replica or self.live()).get(f"/api/v1/deployments/{dep_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    def driver(self, dep_id: str, replica: Replica | None = None) -> str | None:
        """The replica id driving the deployment, per the API (None: nobody holds it)."""
        driver = self.deployment(dep_id, replica).get("driver")
        return None if driver is None else str(driver["replica"])

    def wait_final(self, dep_id: str, timeout: float = 180) -> dict[str, Any]:
        """The deployment's document once it has ended, read from any running replica."""
        return wait_for_state(
            lambda: self.deployment(dep_id),
            lambda d: d["status"] in TERMINAL,
            timeout,
            f"deployment {dep_id} to end",
        )

    def audit(self, dep_id: str, replica: Replica | None = None) -> list[dict[str, Any]]:
        """The deployment's audit records, oldest first."""
        r = self.client(replica or self.live()).get(f"/api/v1/deployments/{dep_id}/audit")
        assert r.status_code == 200, r.text
        return list(r.json()["records"])

    def service(self, service: str, replica: Replica | None = None) -> dict[str, Any]:
        """``GET /api/v1/services/{service}?region=REGION``."""
        r = self.client(replica or self.live()).get(
            f"/api/v1/services/{service}", params={"region": REGION}
        )
        assert r.status_code == 200, f"{service}: {r.status_code} {r.text}"
        doc: dict[str, Any] = r.json()
        return doc

    def verify_audit(self) -> subprocess.CompletedProcess[str]:
        """``shipyard audit verify --database URL`` (as an operator runs it), not checked."""
        return self.cli("audit", "verify", *self.store_args(), check=False)

    # --- tearing down -------------------------------------------------------------------------

    def stop(self) -> None:
        """The agent (SIGTERM: it stops its services), every replica, then PostgreSQL."""
        errors: list[BaseException] = []
        if self.agent is not None:
            for step in (Agent.terminate, Agent.reap):
                try:
                    step(self.agent)
                except BaseException as exc:  # keep stopping the rest
                    errors.append(exc)
        for replica in self.replicas.values():
            try:
                replica.stop()
            except BaseException as exc:
                errors.append(exc)
        try:
            self._closing.close()
        except BaseException as exc:
            errors.append(exc)
        if errors:
            raise errors[0]
