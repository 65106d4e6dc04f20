"""A real Prometheus server of a test's own (``own_prometheus``) and ``promtool``.

Debian's ``prometheus`` package provides the binaries; nothing uses the system service. The
server keeps its TSDB in a temporary directory, listens on loopback on a free port, scrapes the
targets it is given every ``scrape_interval`` (with a bearer token read from a file, as a
production scrape of Shipyard's authenticated ``/metrics`` does) and is stopped (SIGTERM, then
SIGKILL) at the end. ``PrometheusServer.query`` asks its HTTP API (``/api/v1/query``) what it
scraped.

Used by the metrics tests (Shipyard's series scraped and queried back), the analysis tests
(``provider = "prometheus"`` against a real server) and their end-to-end test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

#: How long a started server has to answer ``/-/ready``.
READY_SECONDS = 60.0


@dataclass(frozen=True)
class ScrapeTarget:
    """One scrape job: ``host:port`` and the path, with a bearer token (None: no credentials)."""

    job: str
    address: str
    path: str = "/metrics"
    token: str | None = None
    scheme: str = "http"


@dataclass(frozen=True)
class PrometheusServer:
    """A running server: its base URL (``address``), the directory it runs in."""

    address: str
    directory: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` evaluates to now (``data.result`` of ``/api/v1/query``);
        an error answer raises with Prometheus's own message."""
        r = httpx.get(f"{self.address}/api/v1/query", params={"query": promql}, timeout=10)
        doc = r.json()
        if r.status_code != 200 or doc.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {r.status_code} {doc}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def wait_for(
        self,
        promql: str,
        accept: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Query until ``accept`` takes the result; on timeout the failure shows the last one."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if accept(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting on {promql!r}; last: {result}"
                )
            time.sleep(0.25)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (``/api/v1/targets``)."""
        doc = httpx.get(f"{self.address}/api/v1/targets", timeout=10).json()
        active: list[dict[str, Any]] = doc["data"]["activeTargets"]
        return active

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")


def binary(name: str = "prometheus") -> str:
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install prometheus")
    return found


def available() -> bool:
    return shutil.which("prometheus") is not None and shutil.which("promtool") is not None


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS`` (not checked: the caller asserts on the outcome and output)."""
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    targets: Sequence[ScrapeTarget],
    scrape_interval: str,
    rule_files: Sequence[Path] = (),
) -> Path:
    """``prometheus.yml`` for ``targets`` (JSON is YAML); each token in a file of its own."""
    jobs = []
    for n, t in enumerate(targets):
        job: dict[str, Any] = {
            "job_name": t.job,
            "scheme": t.scheme,
            "metrics_path": t.path,
            "static_configs": [{"targets": [t.address]}],
        }
        if t.token is not None:
            secret = directory / f"token-{n}"
            secret.write_text(t.token)
            secret.chmod(0o600)
            job["authorization"] = {"type": "Bearer", "credentials_file": str(secret)}
        jobs.append(job)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": jobs,
    }
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def own_prometheus(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> Iterator[PrometheusServer]:
    """Start a Prometheus of our own scraping ``targets``; yield it once ready; stop it."""
    root = Path(tempfile.mkdtemp(prefix="shipyard-prom-"))
    config = write_config(root, targets, scrape_interval, rule_files)
    check = promtool("check", "config", str(config))
    if check.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"promtool check config failed: {check.stdout}{check.stderr}")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for attempt in itertools.count():
            port = _free_port()
            with (root / "prometheus.log").open("ab") as log:
                proc = subprocess.Popen(
                    [
                        binary(),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={root / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--web.enable-lifecycle",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            server = PrometheusServer(f"http://127.0.0.1:{port}", root)
            if _ready(server, proc):
                break
            _stop(proc)
            if attempt >= 2:  # the port was taken between choosing and binding, three times
                raise RuntimeError(f"prometheus did not start:\n{server.log()[-3000:]}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _ready(server: PrometheusServer, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.address}/-/ready", timeout=2).status_code == 200:
                return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
