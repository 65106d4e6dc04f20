"""Helpers for end-to-end tests: a real ``shipyard serve`` (and its agent), the example app's git
repository, and wrk as the load generator."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shipyard.api.auth import TokenAuthority

ALL = ["deployment:create", "deployment:read", "deployment:rollback"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Server:
    """``shipyard serve`` as a child process, killable like in production."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shipyard.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"serve exited: {(self.data_dir / 'serve.log').read_text()[-3000:]}"
                )
            try:
                return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "shipyard serve to answer /healthz")
        token = TokenAuthority.from_data_dir(self.data_dir).issue("e2e", ALL)
        if self.client is not None:
            self.client.close()
        self.client = httpx.Client(
            base_url=self.base, timeout=60, headers={"authorization": f"Bearer {token}"}
        )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def stop_agent(self) -> None:
        info = self.data_dir / "agents" / "local" / "agent.json"
        if not info.exists():
            return
        pid = int(json.loads(info.read_text())["pid"])
        try:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not _alive(pid), 20, "the agent to stop")
        except ProcessLookupError:
            pass

    def deploy(self, repo: Path, commit: str, service: str = "hello", **bg: Any) -> str:
        assert self.client is not None
        params = {"switch_delay_seconds": 0, "bake_seconds": 1, "scale_down_delay_seconds": 1, **bg}
        r = self.client.post(
            "/api/v1/deploy",
            json={
                "source": {"repository": str(repo), "branch": "main", "commit": commit},
                "target": {"service_name": service, "region": "local"},
                "strategy": {"BlueGreen": params},
            },
        )
        assert r.status_code == 202, r.text
        return str(r.json()["deployment_id"])

    def deployment(self, dep_id: str) -> dict[str, Any]:
        assert self.client is not None
        doc: dict[str, Any] = self.client.get(f"/api/v1/deployments/{dep_id}").json()
        return doc

    def wait_final(self, dep_id: str, timeout: float = 90) -> dict[str, Any]:
        return dict(
            wait_until(
                lambda: (
                    (d := self.deployment(dep_id))["status"] in ("Success", "Failed", "RolledBack")
                    and d
                ),
                timeout,
                f"deployment {dep_id} to finish",
                interval=0.1,
            )
        )

    def service(self, name: str = "hello") -> dict[str, Any]:
        assert self.client is not None
        doc: dict[str, Any] = self.client.get(f"/api/v1/services/{name}").json()
        return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class WrkResult:
    requests: int
    non_2xx: int
    socket_errors: int
    output: str

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors


class Wrk:
    """wrk running in the background for ``seconds``; ``result()`` waits and parses its report."""

    def __init__(self, url: str, seconds: int, connections: int = 16, threads: int = 2) -> None:
        wrk = shutil.which("wrk")
        assert wrk, "wrk is not installed (scripts/bootstrap.sh installs it)"
        self.proc = subprocess.Popen(
            [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self) -> WrkResult:
        out, _ = self.proc.communicate(timeout=300)
        m = re.search(r"(\d+) requests in", out)
        assert m, f"cannot parse wrk output:\n{out}"
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        return WrkResult(
            requests=int(m.group(1)),
            non_2xx=int(non2xx.group(1)) if non2xx else 0,
            socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
            output=out,
        )
