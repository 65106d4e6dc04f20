"""Helpers for the fleet tests: a control plane with its fleet listener (tests/e2e's ``Server``
with ``--fleet-listen``), ``shipyard region`` from the CLI, and joined agents as processes of
their own on loopback aliases (127.0.0.2, 127.0.0.3, ...)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.token import issue_local
from shipyard.security import pki
from tests.e2e.support import STARTUP_BOUND, Server, free_port, wait_until


class FleetServer(Server):
    """``shipyard serve`` with a fleet listener; ``fleet_url`` once started."""

    fleet_url = ""


def fleet_server(data_dir: Path, *extra: str, shared_dir: Path | None = None) -> FleetServer:
    """``shipyard serve`` with a fleet listener on a free port, started (a replica sharing
    ``shared_dir`` with others when given)."""
    port = free_port()
    server = FleetServer(
        data_dir, "--fleet-listen", f"127.0.0.1:{port}", *extra, shared_dir=shared_dir
    )
    server.start()
    doc = json.loads(((shared_dir or data_dir) / "fleet.json").read_text())
    assert doc["url"] == f"https://127.0.0.1:{port}"
    server.fleet_url = doc["url"]
    return server


def admin_client(server: Server) -> httpx.Client:
    token = issue_local(
        server.data_dir,
        "fleet-admin",
        ["region:admin", "deployment:read"],
        shared_dir=server.shared_dir,
    )
    return httpx.Client(
        base_url=server.base, timeout=60, headers={"authorization": f"Bearer {token}"}
    )


def shipyard(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_BOUND,
        check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def add_region(
    data_dir: Path, name: str, ttl: int = 600, shared_dir: Path | None = None
) -> tuple[str, str]:
    """``shipyard region add``: (join command, token) -- the token is stdout's last line."""
    shared = () if shared_dir is None else ("--shared-dir", str(shared_dir))
    lines = shipyard("region", "add", name, "--data-dir", str(data_dir), "--ttl", str(ttl), *shared)
    *rest, token = lines.stdout.strip().splitlines()
    assert rest and rest[-1].startswith("shipyard agent --join https://"), lines.stdout
    return rest[-1], token


class JoinedAgent:
    """``shipyard agent --join ...`` (or, started again, just ``--data-dir``) as a process."""

    def __init__(self, data_dir: Path, host: str) -> None:
        self.data_dir = data_dir
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        low = free_port()
        self.port_range = (low, min(low + 40, 65535))

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent",
                 "--data-dir", str(self.data_dir), *args],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self.proc

    def join(self, url: str | Sequence[str], token: str) -> JoinedAgent:
        """Join through ``url`` (or several: one ``--join`` each, in order)."""
        low, high = self.port_range
        joins = [a for u in ([url] if isinstance(url, str) else url) for a in ("--join", u)]
        self.start(*joins, "--token", token, "--listen", f"{self.host}:0",
                   "--port-range", f"{low}-{high}")  # fmt: skip
        self.wait_up()
        return self

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log.read_text()[-3000:]}")
            return self.info() is not None

        wait_until(up, STARTUP_BOUND, "the joined agent to serve")

    def info(self) -> dict[str, Any] | None:
        member = self.member()
        if member is None:
            return None
        try:
            doc: dict[str, Any] = json.loads(
                (self.data_dir / "agents" / member["region"] / "agent.json").read_text()
            )
        except (OSError, ValueError):
            return None
        return doc

    def member(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.data_dir / "join.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    @property
    def pem(self) -> Path:
        return self.data_dir / "identity" / "agent.pem"

    def serial(self) -> str:
        return pki.serial_hex(pki.load_certificate(self.pem.read_bytes()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Its replicas are its children (process groups): gone with it; make sure.
        info = self.info()
        if info is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(info["pid"]), signal.SIGKILL)


def deploy_body(repo: Path, region: str, service: str = "hello") -> dict[str, Any]:
    return {
        "source": {"repository": str(repo), "branch": "main", "commit": "HEAD"},
        "target": {"service_name": service, "region": region},
        "strategy": {
            "BlueGreen": {
                "switch_delay_seconds": 0,
                "bake_seconds": 1,
                "scale_down_delay_seconds": 1,
            }
        },
    }
