"""Two services on one shared HTTPS listener, deployed as a user would: ``shipyard agent`` with
``--https-listen``/``--http-listen`` and a certificate directory, ``shipyard serve`` attached to
it, two repositories whose ``shipyard.toml`` name their hosts, ``POST /api/v1/deploy`` for each,
then HTTPS requests by host name checked against the test CA."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shipyard.cli.demo import commit_version, make_example_repo
from tests.e2e.support import Server, free_port, wait_until
from tests.routing.certs import TestCA


def _git(repo: Path, *args: str) -> None:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="e2e",
        GIT_AUTHOR_EMAIL="e2e@shipyard.local",
        GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@shipyard.local",
    )
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def service_repo(path: Path, name: str, extra: str) -> str:
    """The hello example as service ``name`` with ``extra`` lines in its ``[service]``, at a
    version named after it; returns the commit."""
    repo = make_example_repo(path)
    manifest = (repo / "shipyard.toml").read_text()
    (repo / "shipyard.toml").write_text(
        manifest.replace('name = "hello"', f'name = "{name}"\n{extra}', 1)
    )
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"{name}: hosts")
    return commit_version(repo, f"{name}-1")


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[Server, TestCA, int, int]]:
    """An agent with shared listeners, started first; ``shipyard serve`` attaches to it."""
    data = tmp_path / "data"
    certs = tmp_path / "certs"
    ca = TestCA(tmp_path / "ca")
    for name in ("alpha.test", "beta.test"):
        ca.issue(certs, name)
    https_port, http_port = free_port(), free_port()
    data.mkdir()
    log = open(tmp_path / "agent.out", "ab")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir", str(data),
         "--https-listen", f"127.0.0.1:{https_port}", "--http-listen", f"127.0.0.1:{http_port}",
         "--tls-cert-dir", str(certs)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    info = data / "agents" / "local" / "agent.json"
    server = Server(data)
    try:

        def agent_up() -> bool:
            if agent.poll() is not None:
                raise AssertionError((tmp_path / "agent.out").read_text()[-3000:])
            return info.exists() and json.loads(info.read_text())["pid"] == agent.pid

        wait_until(agent_up, 60, "the agent to write agent.json")
        server.start()
        yield server, ca, https_port, http_port
    finally:
        server.stop()
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def test_two_deployed_services_answer_by_host_on_one_https_listener(
    edge: tuple[Server, TestCA, int, int], tmp_path: Path
) -> None:
    server, ca, https_port, http_port = edge
    alpha = service_repo(tmp_path / "alpha", "alpha", 'hosts = ["alpha.test"]\nhsts_max_age = 60')
    beta = service_repo(tmp_path / "beta", "beta", 'hosts = ["beta.test"]\nhttps_redirect = true')
    ids = {
        "alpha": server.deploy(tmp_path / "alpha", alpha, service="alpha"),
        "beta": server.deploy(tmp_path / "beta", beta, service="beta"),
    }
    for name, dep in ids.items():
        final = server.wait_final(dep, timeout=180)
        assert final["status"] == "Success", (name, final.get("error"))

    trusting = ssl.create_default_context(cafile=str(ca.path))
    for name in ("alpha", "beta"):
        # a client per name: httpx pools by address, and a connection made for alpha.test that
        # asks for beta.test gets 421 Misdirected Request (tests/routing/test_entry.py)
        with httpx.Client(verify=trusting, timeout=10) as client:
            r = _get(client, https_port, f"{name}.test")
        assert r.status_code == 200
        assert r.text == f"hello from {name}-1\n"
        assert "x-shipyard-revision" in r.headers  # routed by the router, not answered by it
        assert ("strict-transport-security" in r.headers) == (name == "alpha")

    plain = httpx.get(f"http://127.0.0.1:{http_port}/x", headers={"host": "beta.test"})
    assert plain.status_code == 308
    assert plain.headers["location"] == f"https://beta.test:{https_port}/x"
    unknown = httpx.get(f"http://127.0.0.1:{http_port}/", headers={"host": "gamma.test"})
    assert unknown.status_code == 404

    # and each still has its own port
    assert httpx.get(server.service("alpha")["url"] + "/").text == "hello from alpha-1\n"


def _get(client: httpx.Client, port: int, host: str) -> httpx.Response:
    """GET / for ``host`` over TLS to 127.0.0.1:``port`` (SNI and Host ``host``, certificate
    checked for ``host``): the test's names are in no resolver."""
    return client.get(
        f"https://127.0.0.1:{port}/",
        headers={"host": host},
        extensions={"sni_hostname": host},
    )
