"""Containers end to end (issue 12's "how it will be checked"): the Flask + gunicorn ``notes``
example as an *image*, built from a Dockerfile by ``shipyard serve``'s Docker builder, scanned,
signed and run by the agent as containers on the test session's Docker Engine, behind the same
router, under continuous load.

The image: ``FROM`` the Python base image that ``tests/images.py`` assembles from this host's
Python (nothing can be pulled here), the example's pinned requirements installed with
``pip install --no-index`` from a wheelhouse committed beside the Dockerfile (downloaded once
into a cache directory outside the repository, ``wheelhouse``), the app run by gunicorn as
``USER app``. ``[run]`` names no command: the image's CMD runs. The agent uses host networking
here (``dockerd --bridge=none``), so gunicorn's ``127.0.0.1:$PORT`` is the agent's loopback.

``shipyard serve`` runs with ``DOCKER_HOST`` in its environment (its builder, and the agent it
spawns, use the session's engine). One story, the ``Recorder`` (support.py) GETting ``/``
through the service URL all along:

    v1 -> v2 blue-green (its containers labelled, pinned to the deployment's image ID, their
    output in ``shipyard logs``) -> v3 whose container exits at start (rolled back, exit code
    and output in the error, not one request routed to it) -> v4 a canary answering 500s, rolled
    back by the analysis -> ``shipyard rollback`` of v2 (v1's image started again) -> ``kill -9``
    of the agent: once the control plane has started it again, the same containers (ids, start
    times, restart counts) serve -> ``shipyard service delete`` leaves no container behind.

No request fails except the canary's own 500s and those sent while no agent ran (there is no
router then, so they cannot connect). One story rather than several tests: every deployment
costs an image build, a scan and container creations (on the ``vfs`` storage driver, the
fallback where overlay mounts are unavailable, each copies the whole filesystem). The module
took 5 min 50 s here on vfs with unpaced load (2 cores, load average about 12 from other
suites); about 2 min alone on overlay2 with the Recorder paced.

Beside it, a smoke test on the same server: busybox's httpd in an image ``FROM scratch`` that
names no ``USER`` (it runs as nobody), deployed, answering, deleted without a trace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from docker.models.containers import Container

from shipyard.cli.demo import _git, commit_version, make_notes_repo
from tests.e2e.support import Recorder, Server, wait_for_state, wait_until
from tests.images import APP_UID, APP_USER, BASE_TAG

#: The story builds, scans and starts four images on the vfs driver: longer than one test's
#: default budget (pyproject's ``timeout``) on a busy machine.
# One worker runs the module (tests/conftest.py ONE_WORKER_MODULES), so its stack starts once.
pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(900)]

SERVICE = "notes"
REPLICAS = 2
MEMORY = "256m"
#: Answers a window must hold before it is judged: proof that load reached that state.
SEEN = 30
FAST_ANALYSIS = {"interval_seconds": 1, "min_requests": 20}
LABEL = "dev.shipyard."

MANIFEST = f"""\
[service]
name = "{SERVICE}"

[build]
builder = "docker"

[run]
# no command: the image's CMD runs gunicorn
replicas = {REPLICAS}
memory = "{MEMORY}"
stop_timeout_seconds = 10

[health]
endpoint = "/health"
interval_seconds = 0.25
timeout_seconds = 2
success_threshold = 2
failure_threshold = 3
start_timeout_seconds = 60

[routing]
# x-shipyard-revision on every answer: the load's recorder tells the revisions apart by it.
revision_header = true
"""

#: ``CMD`` of a release that dies at start, the way an app missing its configuration does.
CRASHING_CMD = (
    'CMD ["sh", "-c", "echo notes: starting; echo notes: DATABASE_URL is not set >&2; exit 3"]'
)
#: No WORKDIR (one step fewer): gunicorn changes into /app itself. ``--preload``: the app is
#: imported before gunicorn listens, so a health probe is refused ("still starting") rather than
#: left waiting for a worker that is still importing Flask (slow on a busy machine).
SERVING_CMD = (
    'CMD ["python3", "-m", "gunicorn", "--preload", "--chdir", "/app", '
    '"-c", "/app/gunicorn.conf.py", "app:app"]'
)

DOCKERFILE = f"""\
FROM {BASE_TAG}
# The pinned dependencies from the wheelhouse committed beside this file: no index, no network.
COPY requirements.txt wheels/ /opt/notes/
# ... and the base image's /app, where the app makes its instance/ folder, given to its user. One
# step: on the vfs storage driver every step copies the whole filesystem.
RUN python3 -m pip install -q --no-index --root-user-action=ignore --find-links /opt/notes \\
    -r /opt/notes/requirements.txt \\
 && python3 -c "import os; os.chown('/app', {APP_UID}, {APP_UID})"
USER {APP_USER}
{SERVING_CMD}
# Last: a new version rebuilds only this step.
COPY app.py gunicorn.conf.py *.txt /app/
"""


#: The smoke test's service: busybox's httpd in an image ``FROM scratch``, no USER, no Python.
SMOKE = "smoke"
SMOKE_MANIFEST = f"""\
[service]
name = "{SMOKE}"

[build]
builder = "docker"

[health]
endpoint = "/health"
interval_seconds = 0.25
timeout_seconds = 2
"""
SMOKE_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www/ /www/
CMD ["/bin/busybox", "sh", "-c", "exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /www"]
"""


@dataclass
class Stack:
    server: Server
    repo: Path
    engine: docker.DockerClient
    #: The agent's directory: the value of its containers' ``dev.shipyard.agent`` label.
    agent_dir: str

    def containers(self, *, every: bool = False, service: str = SERVICE) -> list[Container]:
        """This agent's containers of ``service`` (``every``: stopped ones too)."""
        found: list[Container] = self.engine.containers.list(
            all=every,
            filters={"label": [f"{LABEL}agent={self.agent_dir}", f"{LABEL}service={service}"]},
            ignore_removed=True,  # the agent removes containers while we look
        )
        return found


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The notes example's pinned wheels, downloaded from the package index once into a cache
    directory outside any repository (keyed by requirements.txt) and reused after that."""
    requirements = (resources.files("shipyard.examples") / "notes" / "requirements.txt").read_text()
    key = hashlib.sha256(f"{sys.version_info[:2]}\n{requirements}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "shipyard-tests" / "notes-wheels" / key
    if not (target / "complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        (target / "requirements.txt").write_text(requirements)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
             "--only-binary=:all:", "-d", str(target), "-r", str(target / "requirements.txt")],
            check=True, timeout=300,
        )  # fmt: skip
        (target / "complete").write_text("")
    return target


def make_image_repo(path: Path, wheels: Path) -> Path:
    """The notes example as a Dockerfile service: its files, the Dockerfile, the wheelhouse."""
    make_notes_repo(path)
    (path / "shipyard.toml").write_text(MANIFEST)
    (path / "Dockerfile").write_text(DOCKERFILE)
    (path / "wheels").mkdir()
    for wheel in wheels.glob("*.whl"):
        shutil.copy2(wheel, path / "wheels" / wheel.name)
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "notes as an image")
    return path


@pytest.fixture(scope="module")
def stack(
    docker_engine: str,
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("containers")
    repo = make_image_repo(base / "notes-image", wheelhouse)
    server = Server(base / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_HOST", docker_engine)  # serve's builder, and the agent it spawns
        server.start()
    engine = docker.DockerClient(base_url=docker_engine)
    agent_dir = str((server.data_dir / "agents" / "local").resolve())
    stack = Stack(server, repo, engine, agent_dir)
    try:
        yield stack
    finally:
        server.stop()
        server.stop_agent()
        # Containers outlive their agent by design: a failed test must not leave any running.
        for service in (SERVICE, SMOKE):
            for c in stack.containers(every=True, service=service):
                c.remove(force=True)
        engine.close()


# --- helpers --------------------------------------------------------------------------------


def blue_green(**params: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": 1,
            "scale_down_delay_seconds": 2,
            **params,
        }
    }


def final(server: Server, dep_id: str, status: str, what: str) -> dict[str, Any]:
    doc = server.wait_final(dep_id, timeout=240)
    assert doc["status"] == status, f"{what}: {doc['status']}, error: {doc.get('error')}"
    return doc


def shipyard(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """``shipyard ARGS`` as a user types it, with a token minted from the data directory."""
    env = {**os.environ, "COLUMNS": "200", "SHIPYARD_SERVER": server.base,
           "SHIPYARD_DATA_DIR": str(server.data_dir)}  # fmt: skip
    env.pop("SHIPYARD_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def ready_replicas(server: Server, revision: str) -> list[dict[str, Any]]:
    return [
        r for r in server.service(SERVICE)["replicas"] if r["revision"] == revision and r["ready"]
    ]


def routed(server: Server) -> dict[str, float]:
    """Requests each revision of the service has been sent by the router (``/metrics``)."""
    import re

    assert server.client is not None
    text = server.client.get("/metrics").text
    out: dict[str, float] = {}
    for labels, value in re.findall(
        r'^shipyard_router_requests_total\{([^}]*service="' + SERVICE + r'"[^}]*)\} (\S+)$',
        text,
        re.M,
    ):
        revision = re.search(r'revision="([^"]*)"', labels)
        assert revision is not None
        out[revision[1]] = out.get(revision[1], 0.0) + float(value)
    return out


def assert_serves(
    stack: Stack, rec: Recorder, since: float, version: str, revision: str, what: str
) -> None:
    """After ``what``: 100% on ``revision``, all of its replicas ready, every request sent since
    ``since`` answered by ``version``, and not one failed request in the whole story so far."""
    wait_until(
        lambda: len(rec.answers(since=since)) >= SEEN, 30, f"load to reach the service ({what})"
    )
    svc = stack.server.service(SERVICE)
    assert svc["weights"] == {revision: 100}, f"{what}: weights {svc['weights']}"
    assert len(ready_replicas(stack.server, revision)) == REPLICAS, f"{what}: {svc['replicas']}"
    bodies = rec.bodies(since=since)
    assert set(bodies) == {f"notes {version}"}, f"{what}: answers since: {dict(bodies)}"


def assert_containers(stack: Stack, doc: dict[str, Any], what: str) -> dict[str, Container]:
    """The deployment's revision runs as exactly its replicas' containers, labelled, from the
    image the deployment built, scanned and signed (its artifact digest), with the [run]
    limits; returns them by replica id."""
    revision, digest = doc["green_revision"], doc["artifact_digest"]
    assert digest and digest.startswith("sha256:"), f"{what}: artifact digest {digest!r}"
    replicas = {r["replica_id"] for r in ready_replicas(stack.server, revision)}
    assert len(replicas) == REPLICAS, what
    running = [c for c in stack.containers() if c.labels[f"{LABEL}revision"] == revision]
    by_replica = {c.labels[f"{LABEL}replica"]: c for c in running}
    assert set(by_replica) == replicas and len(running) == REPLICAS, f"{what}: {by_replica}"
    for c in running:
        c.reload()
        labels = c.labels
        assert labels[f"{LABEL}service"] == SERVICE, labels
        assert labels[f"{LABEL}artifact-digest"] == digest, labels
        assert c.attrs["Image"] == digest, f"{what}: runs {c.attrs['Image']}, built {digest}"
        assert c.attrs["State"]["Running"] is True
        assert c.attrs["Config"]["User"] == APP_USER  # the image's USER, kept
        assert c.attrs["HostConfig"]["Memory"] == 256 * 1024 * 1024
        assert c.attrs["HostConfig"]["NetworkMode"] == "host"
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert env["SHIPYARD_REVISION"] == revision and "PORT" in env, env
        assert not {k for k in env if k.startswith("DOCKER")}, env  # nothing of the agent's
    return by_replica


def revisions_in_engine(stack: Stack) -> set[str]:
    """The revisions of every container of the service the engine holds, stopped ones too."""
    return {c.labels[f"{LABEL}revision"] for c in stack.containers(every=True)}


def identity(c: Container) -> tuple[str, str, int]:
    c.reload()
    return str(c.id), str(c.attrs["State"]["StartedAt"]), int(c.attrs["RestartCount"])


# --- the story --------------------------------------------------------------------------------


def test_an_image_deploys_blue_green_survives_a_crashing_release_and_a_failing_canary_rolls_back_and_outlives_a_kill_9_agent(  # noqa: E501
    stack: Stack, python_base_image: str
) -> None:
    server, repo = stack.server, stack.repo

    # --- v1: built from the Dockerfile by the server, run as containers ---
    d1 = final(
        server,
        server.deploy_with(repo, _git(repo, "rev-parse", "HEAD"), blue_green(), SERVICE),
        "Success",
        "v1",
    )
    r1, url = d1["green_revision"], d1["result"]["url"]
    assert httpx.get(url, timeout=10).text == "notes v1\n"
    assert_containers(stack, d1, "v1")
    rec = Recorder(url, connections=4).start()
    try:
        assert_serves(stack, rec, rec.step("v1 serving"), "v1", r1, "v1 first deployment")
        assert not rec.failures(), rec.describe_failures()

        # --- v2 blue-green under load ---
        rec.step("v2 blue-green")
        d2 = final(
            server,
            server.deploy_with(repo, commit_version(repo, "v2"), blue_green(), SERVICE),
            "Success",
            "v2 blue-green",
        )
        r2 = d2["green_revision"]
        assert d2["blue_revision"] == r1 and d2["artifact_digest"] != d1["artifact_digest"]
        assert_serves(stack, rec, rec.step("v2 serving"), "v2", r2, "v2 blue-green")
        assert not rec.failures(), f"v2 blue-green: {rec.describe_failures()}"
        v2_containers = assert_containers(stack, d2, "v2")
        wait_until(
            lambda: revisions_in_engine(stack) == {r2},
            30,
            "v1's containers to be stopped and removed after v2",
        )

        # `shipyard logs` shows what gunicorn inside the containers printed
        def logged() -> str | None:
            out = shipyard(server, "logs", SERVICE, "--revision", r2, "--tail", "100").stdout
            return out if out.count("Listening at: http://127.0.0.1:") >= REPLICAS else None

        # Each look is a `shipyard logs` process (a Python start, seconds of CPU under load):
        # look twice a second, not twenty times.
        out = wait_until(logged, 30, "gunicorn's start lines in shipyard logs", interval=0.5)
        for replica, container in v2_containers.items():
            port = container.labels[f"{LABEL}port"]
            assert f"Listening at: http://127.0.0.1:{port}" in out, (replica, out)

        # --- v3: its container exits at start; it never gets a request, v2 keeps serving ---
        rec.step("v3 exits at start")
        (repo / "Dockerfile").write_text(DOCKERFILE.replace(SERVING_CMD, CRASHING_CMD))
        d3 = final(
            server,
            server.deploy_with(repo, commit_version(repo, "v3"), blue_green(), SERVICE),
            "RolledBack",
            "v3, which exits at start",
        )
        r3, error = d3["green_revision"], d3["error"]
        assert "exit code 3" in error["message"], error
        assert error["exit_code"] == 3, error
        assert "notes: DATABASE_URL is not set" in "\n".join(error["output"]), error
        assert routed(server).get(r3, 0.0) == 0.0, f"v3 was sent requests: {routed(server)}"
        assert_serves(stack, rec, rec.step("v2 serving after v3"), "v2", r2, "v3 exited")
        assert not rec.failures(), f"v3 exits at start: {rec.describe_failures()}"
        wait_until(lambda: revisions_in_engine(stack) == {r2}, 30, "v3's exited containers removed")
        assert {c.id for c in stack.containers()} == {c.id for c in v2_containers.values()}

        # --- v4: a canary answering 500s (health stays green), rolled back by the analysis ---
        (repo / "Dockerfile").write_text(DOCKERFILE)
        canary_started = rec.step("v4 failing canary")
        bad = commit_version(repo, "v4", error_rate=0.5)
        canary = {
            "Canary": {
                "stages": [{"weight": 30, "duration_seconds": 30, "analysis": FAST_ANALYSIS}],
                "scale_down_delay_seconds": 1,
            }
        }
        d4 = final(server, server.deploy_with(repo, bad, canary, SERVICE), "RolledBack", "v4")
        canary_done = rec.step("after the v4 canary")
        r4 = d4["green_revision"]
        assert d4["error"]["type"] == "AnalysisFailed", d4["error"]
        assert "success rate" in d4["error"]["message"], d4["error"]
        assert d4["blue_revision"] == r2
        assert_serves(stack, rec, rec.step("v2 serving again"), "v2", r2, "v4 rolled back")
        # The canary's own 500s reached the clients its share of traffic went to; nothing else
        # failed: every failed answer is a 500 from v4, and v2 answered every one of its own.
        failed = [a for a in rec.answers(since=canary_started, until=canary_done) if not a.ok]
        assert failed, "the canary's 500s never reached the load: was it routed at all?"
        assert {(a.status, a.revision, a.body) for a in failed} == {(500, r4, "notes v4 failed")}, (
            rec.describe_failures()
        )
        assert all(a.ok for a in rec.answers() if a.revision != r4), rec.describe_failures()
        wait_until(
            lambda: revisions_in_engine(stack) == {r2}, 30, "the canary's containers removed"
        )
        assert {c.id for c in stack.containers()} == {c.id for c in v2_containers.values()}

        # --- manual rollback of v2 with the CLI: v1's image started again (cold) ---
        rec.step("shipyard rollback of v2")
        rolled = shipyard(server, "rollback", d2["id"])
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert server.deployment(d2["id"])["status"] == "RolledBack"
        assert_serves(stack, rec, rec.step("v1 serving again"), "v1", r1, "rollback to v1")
        v1_again = assert_containers(stack, d1, "v1 after the rollback")
        wait_until(lambda: revisions_in_engine(stack) == {r1}, 30, "v2's containers removed")
        assert not [a for a in rec.failures() if a.revision != r4], rec.describe_failures()

        # --- kill -9 of the agent: the control plane starts it again, it adopts its containers ---
        before = {identity(c) for c in v1_again.values()}
        info = server.data_dir / "agents" / "local" / "agent.json"
        old_pid = int(json.loads(info.read_text())["pid"])
        killed = rec.step("agent killed")
        os.kill(old_pid, signal.SIGKILL)

        def serving_again() -> bool:
            try:
                return httpx.get(url, timeout=2).text == "notes v1\n"
            except httpx.HTTPError:
                return False

        wait_until(serving_again, 60, "the service URL to answer again after kill -9 of the agent")
        back = rec.step("agent back")

        def new_pid() -> int | None:
            try:
                pid = int(json.loads(info.read_text())["pid"])
            except (OSError, ValueError):
                return None
            return pid if pid != old_pid else None

        wait_until(new_pid, 30, "the restarted agent to publish agent.json")

        def replicas_seen() -> tuple[int, Any]:
            # The answer may still be a 503 (region unreachable) while the control plane's
            # client reconnects to the restarted agent: keep it, and wait on.
            assert server.client is not None
            answer = server.client.get(f"/api/v1/services/{SERVICE}")
            return answer.status_code, answer.json()

        wait_for_state(
            replicas_seen,
            lambda seen: (
                seen[0] == 200
                and len([r for r in seen[1]["replicas"] if r["revision"] == r1 and r["ready"]])
                == REPLICAS
            ),
            30,
            "v1's replicas ready in the restarted agent",
        )
        after = {identity(c) for c in stack.containers(every=True)}
        assert after == before, "the restarted agent must adopt its containers, not restart them"
        assert_serves(stack, rec, rec.step("v1 serving after the agent"), "v1", r1, "agent back")
        # With no agent there is no router: requests in flight at the kill were cut, those sent
        # meanwhile could not connect, or the restarting router answered them itself (no
        # revision: no app was reached). None got an app's error or a wrong answer, and none
        # failed once it was back.
        outage = [a for a in rec.failures() if a.done >= killed and a.sent <= back]
        seen = Counter(f"{a.step}: {a.status} {a.body[:60]}" for a in outage)
        assert all(a.status is None or (a.status >= 500 and not a.revision) for a in outage), seen
        assert all(a.ok for a in rec.answers(since=back)), rec.describe_failures()
    finally:
        rec.stop()

    assert len(rec.answers()) > 1000, f"only {len(rec.answers())} requests: did the load run?"
    unexpected = [
        a for a in rec.failures() if a.revision != r4 and not (a.done >= killed and a.sent <= back)
    ]
    assert not unexpected, rec.describe_failures()
    assert {a.body for a in rec.answers() if a.ok} == {"notes v1", "notes v2", "notes v4"}

    # --- deleting the service leaves no container behind ---
    deleted = shipyard(server, "service", "delete", SERVICE, "--yes")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    # Bounded by what a loaded machine needs: each replica drains, gets its stop timeout, and
    # vfs deletes a whole filesystem copy per container (the CI run under four workers needed
    # more than 30 s).
    wait_for_state(
        lambda: [(c.name, c.status) for c in stack.containers(every=True)],
        lambda left: not left,
        120,
        "no container of the service left",
    )


def test_a_busybox_image_without_a_user_serves_as_nobody_and_leaves_no_container(
    stack: Stack, tmp_path: Path
) -> None:
    """The smallest image there is: no base image, no USER, no language runtime."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.fail("the smoke test needs a static /bin/busybox (Debian: busybox-static)")
    repo = tmp_path / "smoke"
    (repo / "www").mkdir(parents=True)
    shutil.copy2(busybox, repo / "busybox")
    (repo / "www" / "index.html").write_text("smoke v1\n")
    (repo / "www" / "health").write_text("ok\n")
    (repo / "shipyard.toml").write_text(SMOKE_MANIFEST)
    (repo / "Dockerfile").write_text(SMOKE_DOCKERFILE)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "busybox httpd")
    server = stack.server
    doc = final(
        server,
        server.deploy_with(repo, _git(repo, "rev-parse", "HEAD"), blue_green(), SMOKE),
        "Success",
        "the busybox image",
    )
    assert httpx.get(doc["result"]["url"], timeout=10).text == "smoke v1\n"
    [container] = stack.containers(service=SMOKE)
    assert container.attrs["Image"] == doc["artifact_digest"]
    assert container.labels[f"{LABEL}revision"] == doc["green_revision"]
    assert container.attrs["Config"]["User"] == "65534:65534"  # an image naming no USER: nobody
    deleted = shipyard(server, "service", "delete", SMOKE, "--yes")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    wait_until(
        lambda: not stack.containers(every=True, service=SMOKE), 30, "no smoke container left"
    )
