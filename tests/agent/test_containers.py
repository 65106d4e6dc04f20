"""Image revisions run as containers on a real Docker Engine (the session's, tests/docker_engine.py;
images built on the host-Python base of tests/images.py): labels, image ID pinning, limits and
confinement, exit codes and logs, restarts, stopping, and re-adoption by an agent started after
the previous one was killed with SIGKILL. The agent is driven through its API, in-process
(``httpx.ASGITransport``) or as a real ``shipyard agent`` process where it has to die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import docker
import docker.errors
import httpx
import pytest

from shipyard.agent.containers import LABELS, ContainerLauncher, label
from shipyard.agent.images import ensure_image, is_registry_reference
from shipyard.agent.replica_logs import LogLimits, ReplicaLog
from shipyard.agent.server import Agent
from shipyard.agent.supervisor import Replica, RestartPolicy
from shipyard.errors import ArtifactVerificationFailed
from shipyard.runtime.base import ContainerSpec, RevisionSpec
from shipyard.security import signing
from tests.agent.helpers import SIGNER, TRUSTED_KEY, eventually, running_agent
from tests.images import build_app_image

# One worker runs the module (tests/conftest.py ONE_WORKER_MODULES), so its image is built once.
pytestmark = pytest.mark.docker

FAST = RestartPolicy(initial_delay=0.05, max_delay=1.0, ready_timeout=30, ready_interval=0.05)
NEVER = RestartPolicy(initial_delay=600, max_delay=600)

#: The app in the test images: ``GET /`` answers ``<revision> <replica> <uid>``; ``/exit/<n>``
#: exits with n; ``/say/<stream>/<text>`` prints text on that stream; ``/env`` the environment.
APP = """\
import json, os, sys, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

print("started", os.environ["SHIPYARD_REPLICA"], flush=True)

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.split("/")
        if parts[1] == "exit":
            os._exit(int(parts[2]))
        if parts[1] == "say":
            out = sys.stderr if parts[2] == "stderr" else sys.stdout
            print(urllib.parse.unquote(parts[3]), file=out, flush=True)
        if parts[1] == "env":
            body = json.dumps(dict(os.environ)).encode()
        else:
            body = " ".join([os.environ["SHIPYARD_REVISION"], os.environ["SHIPYARD_REPLICA"],
                             str(os.getuid())]).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def client(docker_engine: str) -> Iterator[docker.DockerClient]:
    c = docker.DockerClient(base_url=docker_engine)
    yield c
    c.close()


@pytest.fixture(scope="module")
def app_image(
    client: docker.DockerClient, python_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The app's image (``USER app``), tagged ``shipyard-test/app:v1``; its ID."""
    context = tmp_path_factory.mktemp("app-image")
    return build_app_image(
        client, context, {"app.py": APP}, "shipyard-test/app:v1", command=["python3", "app.py"]
    )


def image_spec(
    image_id: str,
    location: str,
    revision: str = "v1",
    *,
    argv: list[str] | None = None,
    container: ContainerSpec | None = None,
    env: dict[str, str] | None = None,
    replicas: int = 1,
) -> RevisionSpec:
    """An image revision signed the way the security gate signs it (the statement names the
    image ID)."""
    statement = signing.provenance_statement(
        subject_name="svc",
        subject_digest=image_id,
        builder_id="urn:shipyard:builder:test",
        source_repository=None,
        commit="0" * 40,
        build_command=None,
    )
    return RevisionSpec(
        service="svc",
        revision=revision,
        artifact_digest=image_id,
        artifact_location=location,
        argv=argv or [],
        env=env or {},
        replicas=replicas,
        health_endpoint="/",
        provenance=signing.sign_statement(SIGNER, statement),
        artifact_kind="oci-image",
        container=container,
        stop_timeout=2.0,
    )


def own_containers(client: docker.DockerClient, agent_dir: Path) -> list[Any]:
    """The agent's containers, as one listing (``sparse``: docker-py otherwise inspects each
    listed container, and one the agent removes in between raised NotFound). ``reload()`` one
    for its full ``attrs``."""
    return list(
        client.containers.list(
            all=True, sparse=True, filters={"label": f"{label('agent')}={agent_dir.resolve()}"}
        )
    )


def remove_all(client: docker.DockerClient, agent_dir: Path) -> None:
    """Remove the containers of the agent in ``agent_dir`` (a test's teardown), and wait until
    they are gone (a removal the agent began may still be under way: 409)."""
    for c in own_containers(client, agent_dir):
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
    deadline = time.monotonic() + 60
    while own_containers(client, agent_dir):
        assert time.monotonic() < deadline, "containers still there 60 s after their removal"
        time.sleep(0.1)


@pytest.fixture
async def agent(
    tmp_path: Path, docker_engine: str, client: docker.DockerClient
) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with contained(tmp_path / "data", docker_engine, client, restart=FAST) as pair:
        yield pair


class contained:
    """``running_agent`` on the test engine; at the end the containers it leaves running (a
    clean close keeps them for the next agent) are removed, so no test leaks one."""

    def __init__(
        self, data: Path, docker_engine: str, client: docker.DockerClient, **options: Any
    ) -> None:
        self._cm = running_agent(data, docker_host=docker_engine, **options)
        self._client = client
        self._dir = data / "agents" / "local"

    async def __aenter__(self) -> tuple[Agent, httpx.AsyncClient]:
        pair = await self._cm.__aenter__()
        await pair[0].restore()
        return pair

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)
        remove_all(self._client, self._dir)


async def put(client: httpx.AsyncClient, spec: RevisionSpec) -> httpx.Response:
    return await client.put(
        f"/v1/services/{spec.service}/revisions/{spec.revision}", json=spec.to_dict()
    )


async def replica_state(client: httpx.AsyncClient, replica_id: str) -> dict[str, Any] | None:
    state = (await client.get("/v1/services/svc")).json()
    found = [r for r in state["replicas"] if r["replica_id"] == replica_id]
    return dict(found[0]) if found else None


async def answer(url: str) -> str | None:
    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            r = await c.get(url)
    except httpx.TransportError:
        return None
    return r.text if r.status_code == 200 else None


async def serve(client: httpx.AsyncClient, spec: RevisionSpec) -> dict[str, Any]:
    """Start ``spec``, wait until its replica answers, route everything to it."""
    r = await put(client, spec)
    assert r.status_code == 200, r.text
    [rep] = r.json()["replicas"]
    await eventually(lambda: answer(f"http://127.0.0.1:{rep['port']}/"), what="the container")
    r = await client.post(
        "/v1/services/svc/routable", json={"replica_ids": [rep["replica_id"]], "routable": True}
    )
    assert r.status_code == 200, r.text
    r = await client.put("/v1/services/svc/weights", json={"weights": {spec.revision: 100}})
    assert r.status_code == 200, r.text
    return dict(rep)


async def log_texts(client: httpx.AsyncClient, replica_id: str) -> list[tuple[str, str]]:
    r = await client.post("/v1/services/svc/logs", json={"replica_id": replica_id, "tail": 1000})
    assert r.status_code == 200, r.text
    return [(line["stream"], line["text"]) for line in r.json()["lines"]]


# --- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        pytest.param("127.0.0.1:5000/svc@sha256:" + "a" * 64, True, id="host-port-digest"),
        pytest.param("registry.example.com/team/svc@sha256:" + "a" * 64, True, id="dns-host"),
        pytest.param("localhost/svc@sha256:" + "a" * 64, True, id="localhost"),
        pytest.param("shipyard/svc:abc123", False, id="local-tag"),
        pytest.param("shipyard/svc@sha256:" + "a" * 64, False, id="no-registry-host"),
        pytest.param("127.0.0.1:5000/svc:latest", False, id="registry-tag"),
    ],
)
def test_registry_references_have_a_host_and_a_digest(location: str, expected: bool) -> None:
    assert is_registry_reference(location) is expected


# --- the image check -----------------------------------------------------------------------------


def test_ensure_image_pins_the_signed_id(
    client: docker.DockerClient, app_image: str, python_base_image: str
) -> None:
    assert ensure_image(client, "shipyard-test/app:v1", app_image, where="svc/v1") == app_image
    with pytest.raises(ArtifactVerificationFailed) as refused:
        ensure_image(client, "shipyard-test/python:3.11", app_image, where="svc/v1")
    assert refused.value.detail["reason"] == "image_mismatch"
    assert app_image in refused.value.message and python_base_image in refused.value.message
    with pytest.raises(ArtifactVerificationFailed) as gone:
        ensure_image(client, "shipyard-test/nothing:1", app_image, where="svc/v1")
    assert gone.value.detail["reason"] == "reference_missing"
    absent = "sha256:" + "e" * 64
    with pytest.raises(ArtifactVerificationFailed) as missing:
        ensure_image(client, "shipyard-test/nothing:1", absent, where="svc/v1")
    assert missing.value.detail["reason"] == "image_missing" and absent in missing.value.message
    # the signed image is gone and its tag names another one: replaced, both digests named
    with pytest.raises(ArtifactVerificationFailed) as replaced:
        ensure_image(client, "shipyard-test/app:v1", absent, where="svc/v1")
    assert replaced.value.detail["reason"] == "image_mismatch"
    assert absent in replaced.value.message and app_image in replaced.value.message


async def test_a_retagged_image_is_refused_naming_both_digests_and_nothing_starts(
    agent: tuple[Agent, httpx.AsyncClient],
    client: docker.DockerClient,
    app_image: str,
    python_base_image: str,
) -> None:
    a, api = agent
    client.images.get(app_image).tag("shipyard-test/re", "1")
    signed, spec = app_image, image_spec(app_image, "shipyard-test/re:1")
    client.images.get(python_base_image).tag("shipyard-test/re", "1")  # moved after signing
    replaced = python_base_image

    r = await put(api, spec)

    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "artifact_verification_failed"
    assert (problem["check"], problem["reason"]) == ("image", "image_mismatch")
    assert signed in problem["message"] and replaced in problem["message"]
    assert own_containers(client, a.dir) == []
    assert a.supervisor.replicas == {}


# --- running -------------------------------------------------------------------------------------


async def test_a_container_is_labelled_pinned_limited_and_confined(
    agent: tuple[Agent, httpx.AsyncClient],
    client: docker.DockerClient,
    app_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENT_ONLY_SECRET", "never-in-a-container")
    a, api = agent
    limits = ContainerSpec(memory_bytes=96 * 2**20, nano_cpus=500_000_000)
    spec = image_spec(app_image, "shipyard-test/app:v1", container=limits, env={"GREETING": "hi"})

    rep = await serve(api, spec)

    url = a.url(a.routes["svc"])
    assert await answer(url + "/") == f"v1 {rep['replica_id']} 1000"  # through the router, as app
    [container] = own_containers(client, a.dir)
    assert rep["container_id"] == container.id
    container.reload()
    attrs = container.attrs
    labels = attrs["Config"]["Labels"]
    assert {k: labels[label(k)] for k in LABELS} == {
        "service": "svc",
        "revision": "v1",
        "replica": rep["replica_id"],
        "artifact-digest": app_image,
        "region": "local",
        "agent": str(a.dir.resolve()),
        "port": str(rep["port"]),
    }
    assert attrs["Image"] == app_image
    assert attrs["Config"]["Image"] == app_image  # created from the ID, not the tag
    host = attrs["HostConfig"]
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"]) == (96 * 2**20,) * 2 + (5e8,)
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NetworkMode"] == "host"  # auto: this engine has no bridge
    assert not host.get("Binds") and attrs["Mounts"] == []
    assert attrs["Config"]["User"] == "app"
    env = json.loads(await answer(f"http://127.0.0.1:{rep['port']}/env") or "{}")
    assert env["PORT"] == str(rep["port"]) and env["GREETING"] == "hi"
    assert (env["SHIPYARD_SERVICE"], env["SHIPYARD_REVISION"]) == ("svc", "v1")
    assert env["SHIPYARD_REPLICA"] == rep["replica_id"]
    assert env["SHIPYARD_REGION"] == agent[0].region
    assert "AGENT_ONLY_SECRET" not in env
    health = (await api.get("/v1/health")).json()
    assert health["artifact_kinds"] == ["directory", "oci-image"]


async def test_an_image_without_user_runs_as_nobody(
    agent: tuple[Agent, httpx.AsyncClient], python_base_image: str
) -> None:
    _, api = agent
    # The base image names no USER; the app comes in the command.
    spec = image_spec(python_base_image, "shipyard-test/python:3.11", argv=["python3", "-c", APP])

    rep = await serve(api, spec)

    assert (await answer(f"http://127.0.0.1:{rep['port']}/") or "").endswith(" 65534")
    env = json.loads(await answer(f"http://127.0.0.1:{rep['port']}/env") or "{}")
    assert env["HOME"] == "/tmp"


async def test_the_manifest_command_replaces_the_images_entrypoint_and_cmd(
    agent: tuple[Agent, httpx.AsyncClient],
    client: docker.DockerClient,
    python_base_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An image built to start something else (ENTRYPOINT and CMD that would exit 9) runs what
    ``[run] command`` says, as Kubernetes' ``command`` does; without one the image's own runs."""
    _, api = agent
    context = tmp_path_factory.mktemp("entrypoint-image")
    image = build_app_image(
        client,
        context,
        {"app.py": APP},
        "shipyard-test/app:entrypoint",
        command=["-c", "import sys; sys.exit(9)"],
        extra='ENTRYPOINT ["python3"]',
    )
    spec = image_spec(image, "shipyard-test/app:entrypoint", argv=["python3", "app.py"])

    rep = await serve(api, spec)

    assert (await answer(f"http://127.0.0.1:{rep['port']}/") or "").startswith("v1 ")
    [container] = own_containers(client, agent[0].dir)
    container.reload()
    assert container.attrs["Config"]["Entrypoint"] == ["python3"]
    assert container.attrs["Config"]["Cmd"] == ["app.py"]


async def test_a_container_that_exits_at_start_is_crashed_with_its_code_and_output(
    tmp_path: Path, docker_engine: str, client: docker.DockerClient, app_image: str
) -> None:
    failing = ["python3", "-c", "import sys; print('cannot start: no DATABASE_URL', "
               "file=sys.stderr); sys.exit(7)"]  # fmt: skip
    async with contained(tmp_path / "data", docker_engine, client, restart=NEVER) as (a, api):
        r = await put(api, image_spec(app_image, "shipyard-test/app:v1", argv=failing))
        assert r.status_code == 200, r.text
        [rep] = r.json()["replicas"]

        async def crashed() -> dict[str, Any] | None:
            state = await replica_state(api, rep["replica_id"])
            return state if state and state["state"] == "crashed" else None

        state = await eventually(crashed, what="the container's exit")
        assert state["exit_code"] == 7 and state["routable"] is False
        lines = await log_texts(api, rep["replica_id"])
        assert ("stderr", "cannot start: no DATABASE_URL") in lines

        async def removed() -> bool:  # the dead one is removed; its restart is far away
            return own_containers(client, a.dir) == []

        await eventually(removed, what="the exited container removed")


async def test_output_is_kept_apart_by_stream_and_masked(
    agent: tuple[Agent, httpx.AsyncClient], app_image: str
) -> None:
    a, api = agent
    rep = await serve(api, image_spec(app_image, "shipyard-test/app:v1"))
    port = rep["port"]

    await answer(f"http://127.0.0.1:{port}/say/stdout/to%20stdout")
    await answer(f"http://127.0.0.1:{port}/say/stderr/to%20stderr")
    await answer(f"http://127.0.0.1:{port}/say/stdout/token%20{a.token}")

    async def said() -> list[tuple[str, str]] | None:
        lines = await log_texts(api, rep["replica_id"])
        return lines if len(lines) >= 4 else None

    lines = await eventually(said, what="the lines in the log")
    assert lines[:3] == [
        ("stdout", f"started {rep['replica_id']}"),
        ("stdout", "to stdout"),
        ("stderr", "to stderr"),
    ]
    assert lines[3][0] == "stdout" and a.token not in lines[3][1]
    assert lines[3][1].startswith("token ")


async def test_a_crashed_container_is_replaced_for_the_same_replica(
    agent: tuple[Agent, httpx.AsyncClient], client: docker.DockerClient, app_image: str
) -> None:
    a, api = agent
    rep = await serve(api, image_spec(app_image, "shipyard-test/app:v1"))
    url = a.url(a.routes["svc"])

    await answer(f"http://127.0.0.1:{rep['port']}/exit/3")

    async def back() -> dict[str, Any] | None:
        state = await replica_state(api, rep["replica_id"])
        if state is None or (state["restarts"], state["state"]) != (1, "running"):
            return None
        return state if state["routable"] else None

    state = await eventually(back, what="the replica restarted")
    assert state["last_exit_code"] == 3
    assert state["container_id"] != rep["container_id"]
    assert await answer(url + "/") == f"v1 {rep['replica_id']} 1000"
    assert [c.id for c in own_containers(client, a.dir)] == [state["container_id"]]


async def test_stopping_removes_the_container(
    agent: tuple[Agent, httpx.AsyncClient], client: docker.DockerClient, app_image: str
) -> None:
    a, api = agent
    rep = await serve(api, image_spec(app_image, "shipyard-test/app:v1"))

    r = await api.post(
        "/v1/services/svc/stop", json={"replica_ids": [rep["replica_id"]], "drain_timeout": 5}
    )

    assert r.status_code == 200, r.text
    assert r.json()["replicas"] == [] and a.supervisor.replicas == {}
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(rep["container_id"])


async def test_a_clean_close_leaves_containers_for_the_next_agent(
    tmp_path: Path, docker_engine: str, client: docker.DockerClient, app_image: str
) -> None:
    data = tmp_path / "data"
    async with running_agent(data, docker_host=docker_engine, restart=FAST) as (a, api):
        await a.restore()
        rep = await serve(api, image_spec(app_image, "shipyard-test/app:v1"))
        started_at = client.containers.get(rep["container_id"]).attrs["State"]["StartedAt"]
    async with contained(data, docker_engine, client, restart=FAST) as (b, api):
        state = await replica_state(api, rep["replica_id"])
        assert state is not None
        assert (state["container_id"], state["port"], state["restarts"]) == (
            rep["container_id"],
            rep["port"],
            0,
        )
        assert client.containers.get(rep["container_id"]).attrs["State"]["StartedAt"] == (
            started_at
        )
        assert await answer(b.url(b.routes["svc"]) + "/") == f"v1 {rep['replica_id']} 1000"


async def test_no_agent_has_no_engine_and_refuses_images(tmp_path: Path, app_image: str) -> None:
    missing = f"unix://{tmp_path}/no-docker.sock"
    async with running_agent(tmp_path / "data", docker_host=missing) as (_, api):
        health = (await api.get("/v1/health")).json()
        assert health["artifact_kinds"] == ["directory"]
        assert health["docker"]["address"] == missing and health["docker"]["error"]
        r = await put(api, image_spec(app_image, "shipyard-test/app:v1"))
        assert r.status_code == 422
        assert (r.json()["check"], r.json()["reason"]) == ("image", "no_engine")


# --- a real agent process, killed ---------------------------------------------------------------


class AgentProcess:
    """``shipyard agent`` as its own process, on the test engine, trusting the test key."""

    def __init__(self, tmp: Path, docker_engine: str) -> None:
        self.data = tmp / "data"
        self.dir = self.data / "agents" / "local"
        self.key = tmp / "trusted.pub"
        self.key.write_text(TRUSTED_KEY)
        self.docker_engine = docker_engine
        self.log = tmp / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> httpx.AsyncClient:
        (self.dir / "agent.json").unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir",
                 str(self.data), "--trusted-key", str(self.key), "--docker-host",
                 self.docker_engine],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )  # fmt: skip
        info = self.dir / "agent.json"

        async def started() -> dict[str, Any] | None:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            return json.loads(info.read_text()) if info.exists() else None

        # A loaded CI machine (four workers, dockerd on vfs) needed more than 30 s once.
        found = await eventually(started, timeout=60, what="the agent starting")
        token = (self.dir / "agent.token").read_text().strip()
        return httpx.AsyncClient(
            base_url=found["api_url"], headers={"authorization": f"Bearer {token}"}, timeout=30
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def test_after_sigkill_the_next_agent_adopts_its_containers_and_removes_orphans(
    tmp_path: Path, docker_engine: str, client: docker.DockerClient, app_image: str
) -> None:
    agent = AgentProcess(tmp_path, docker_engine)
    try:
        api = await agent.start()
        spec = replace(image_spec(app_image, "shipyard-test/app:v1"), replicas=1)
        rep = await serve(api, spec)
        url = (await api.get("/v1/services/svc")).json()["url"]
        assert await answer(f"http://127.0.0.1:{rep['port']}/say/stdout/before%20the%20kill")
        started_at = client.containers.get(rep["container_id"]).attrs["State"]["StartedAt"]
        await api.aclose()

        agent.kill()
        # An orphan: this agent's labels, but no state names it.
        orphan = client.containers.run(
            app_image, ["python3", "-c", "import time; time.sleep(600)"], detach=True,
            network_mode="host", labels={label("agent"): str(agent.dir.resolve())},
        )  # fmt: skip
        # The container outlived its agent (the router went with the agent).
        assert await answer(f"http://127.0.0.1:{rep['port']}/") == f"v1 {rep['replica_id']} 1000"

        api = await agent.start()
        state = (await api.get("/v1/services/svc")).json()
        [again] = state["replicas"]
        assert (again["replica_id"], again["container_id"], again["port"]) == (
            rep["replica_id"],
            rep["container_id"],
            rep["port"],
        )
        assert (again["restarts"], again["state"], again["routable"]) == (0, "running", True)
        assert client.containers.get(rep["container_id"]).attrs["State"]["StartedAt"] == (
            started_at
        )
        assert state["url"] == url and state["weights"] == {"v1": 100}
        assert await answer(url + "/") == f"v1 {rep['replica_id']} 1000"
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(orphan.id)
        assert await answer(f"http://127.0.0.1:{rep['port']}/say/stdout/after%20the%20kill")

        async def after() -> list[tuple[str, str]] | None:
            lines = await log_texts(api, rep["replica_id"])
            return lines if ("stdout", "after the kill") in lines else None

        lines = await eventually(after, what="the adopted container's output")
        assert lines.count(("stdout", "before the kill")) == 1  # not stored twice
        assert lines.count(("stdout", f"started {rep['replica_id']}")) == 1
        await api.aclose()
    finally:
        agent.stop()
        remove_all(client, agent.dir)
    assert own_containers(client, agent.dir) == []


# --- networking options (pure: this engine has no bridge to publish on) ------------------------


@pytest.mark.parametrize(
    ("container", "exposed", "inner"),
    [
        pytest.param(ContainerSpec(port=5000), {"8000/tcp": {}}, 5000, id="manifest-port"),
        pytest.param(None, {"9000/udp": {}, "8000/tcp": {}}, 8000, id="image-expose"),
        pytest.param(None, {}, 8080, id="default"),
    ],
)
def test_publish_mode_maps_the_container_port_to_a_loopback_host_port(
    tmp_path: Path, container: ContainerSpec | None, exposed: dict[str, Any], inner: int
) -> None:
    launcher = ContainerLauncher(
        cast(docker.DockerClient, None),
        cast(docker.DockerClient, None),
        agent_id="/agents/x",
        region="local",
        network="publish",
    )
    spec = replace(image_spec("sha256:" + "a" * 64, "x:1"), container=container)
    log = ReplicaLog(tmp_path / "log", LogLimits(), service="svc", revision="v1", replica_id="r")
    replica = Replica("r", spec, 41234, log, tmp_path / "run")

    options = launcher._create_options(replica, {"User": "", "ExposedPorts": exposed}, "publish")

    assert options["ports"] == {f"{inner}/tcp": ("127.0.0.1", 41234)}
    assert "network_mode" not in options
    assert options["environment"]["PORT"] == str(inner)
    assert (options["user"], options["environment"]["HOME"]) == ("65534:65534", "/tmp")
    assert options["labels"][label("port")] == "41234"
    host = launcher._create_options(replica, {"User": "www"}, "host")
    assert host["network_mode"] == "host" and "ports" not in host
    assert host["environment"]["PORT"] == "41234" and host["user"] == "www"
    assert "HOME" not in host["environment"]
