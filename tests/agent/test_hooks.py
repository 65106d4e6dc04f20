"""Hooks on a real agent (``agent/hooks.py``), called the way the control plane calls them: its
API under uvicorn on a socket, through ``runtime.local.LocalRuntime.run_hook`` (so the output
really streams). A real directory artifact holds ``hook.py``; the hook runs sandboxed as a
replica would, with the replica's environment and not the agent's; a timeout kills it; its
output arrives while it runs; an artifact the control plane did not sign as it is now is
refused before anything runs. One image hook runs on the Docker Engine."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest
import uvicorn

from shipyard.agent.api import build_app
from shipyard.agent.server import Agent
from shipyard.errors import ArtifactVerificationFailed, RevisionStartFailed
from shipyard.runtime.base import HookRun, RevisionSpec
from shipyard.runtime.local import AgentClient, LocalRuntime
from shipyard.security import signing
from tests.agent.helpers import SIGNER, eventually, running_agent, sign
from tests.images import build_app_image

HOOK = """\
import json, os, sys, time, urllib.request

mode = sys.argv[1]
if mode == "env":
    wrote = "no"
    try:
        with open("written-by-hook", "w") as f:
            f.write("x")
        wrote = "yes"
    except OSError:
        pass
    print(json.dumps({
        "environ": dict(os.environ),
        "uid": os.getuid(),
        "cwd": os.getcwd(),
        "wrote": wrote,
        "sees_data_dir": os.path.exists(sys.argv[2]),
    }), flush=True)
elif mode == "secrets":
    import hashlib
    folder = os.environ["SHIPYARD_SECRETS_DIR"]
    with open(os.path.join(folder, "db_password"), "rb") as f:
        value = f.read()
    # A digest: the value itself would be masked in the output.
    print(json.dumps({
        "file": hashlib.sha256(value).hexdigest(),
        "env": hashlib.sha256(os.environ["API_TOKEN"].encode()).hexdigest(),
    }), flush=True)
elif mode == "fail":
    print("migrating", flush=True)
    print("boom: relation exists", file=sys.stderr, flush=True)
    sys.exit(3)
elif mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(600)
elif mode == "wait-for":
    print("waiting for the go", flush=True)
    while urllib.request.urlopen(sys.argv[2]).read() != b"go":
        time.sleep(0.05)
    print("went", flush=True)
"""


def hook_artifact(root: Path, name: str = "artifact") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "hook.py").write_text(HOOK)
    for p in (d / "hook.py", d):
        p.chmod(0o555 if p.is_dir() else 0o444)
    return d


def hook_spec(artifact: Path) -> RevisionSpec:
    return sign(
        RevisionSpec(
            service="svc",
            revision="v2",
            artifact_digest="sha256:" + "0" * 64,
            artifact_location=str(artifact),
            argv=["python3", "app.py"],
            env={"GREETING": "hello", "DATABASE_URL": "postgres://db/app"},
        )
    )


@contextlib.asynccontextmanager
async def served_agent(data_dir: Path, **options: Any) -> AsyncIterator[tuple[Agent, LocalRuntime]]:
    """An agent whose API listens on a real socket, and the control plane's client of it;
    ``options`` go to ``Agent``."""
    async with running_agent(data_dir, **options) as (agent, _):
        server = uvicorn.Server(
            uvicorn.Config(build_app(agent), log_level="warning", lifespan="off")
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        serving = asyncio.create_task(server.serve(sockets=[sock]))

        async def started() -> bool:
            return server.started

        await eventually(started, what="the agent's API listening")
        runtime = LocalRuntime("local", AgentClient(url, agent.token, "local"))
        try:
            yield agent, runtime
        finally:
            await runtime.aclose()
            server.should_exit = True
            await serving
            sock.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, LocalRuntime]]:
    async with served_agent(tmp_path / "data") as pair:
        yield pair


async def run(
    runtime: LocalRuntime, spec: RevisionSpec, *argv: str, timeout: float = 60.0
) -> tuple[Any, list[str]]:
    lines: list[str] = []
    result = await runtime.run_hook(
        spec, HookRun("pre_deploy", ["python3", "hook.py", *argv], timeout), lines.append
    )
    return result, lines


async def test_a_hook_runs_sandboxed_with_the_replicas_environment(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    a, runtime = agent
    artifact = hook_artifact(tmp_path)
    before = sorted(p.name for p in artifact.iterdir())
    secret = tmp_path / "data" / "signing.key"  # in the data directory: workloads never see it
    secret.write_text("private")
    result, lines = await run(runtime, hook_spec(artifact), "env", str(secret))
    assert result.exit_code == 0 and not result.timed_out, lines
    report = json.loads(lines[0])
    environ: dict[str, str] = report["environ"]
    assert environ["SHIPYARD_HOOK"] == "pre_deploy"
    assert environ["SHIPYARD_SERVICE"] == "svc"
    assert environ["SHIPYARD_REVISION"] == "v2"
    assert environ["GREETING"] == "hello"  # [run] env, as a replica gets it
    assert environ["DATABASE_URL"] == "postgres://db/app"
    assert "PORT" not in environ  # nothing may listen for traffic
    assert a.token not in json.dumps(environ)  # never the agent's own environment
    assert "/hook-v2-pre_deploy-" in environ["HOME"]
    # The sandbox: the service's own uid, the data directory hidden, the artifact unchanged
    # (a write lands in the overlay's upper layer, or is refused by the read-only artifact).
    assert report["uid"] != 0
    assert report["sees_data_dir"] is False
    assert sorted(p.name for p in artifact.iterdir()) == before
    # The run directory is gone with the hook, and nothing became a replica.
    assert not any(p.name.startswith("hook-") for p in (a.dir / "run").glob("*"))
    assert a.supervisor.replicas == {}


async def test_a_hook_gets_the_replicas_secret_files_and_variables(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    spec = sign(
        replace(
            hook_spec(hook_artifact(tmp_path)),
            secret_env={"API_TOKEN": "tok-1234567890"},
            secret_files={"db_password": "pw-0987654321"},
        )
    )
    result, lines = await run(runtime, spec, "secrets")
    assert result.exit_code == 0, lines
    report = json.loads(lines[0])
    # Read through SHIPYARD_SECRETS_DIR inside the sandbox, as a replica reads them.
    assert report["file"] == hashlib.sha256(b"pw-0987654321").hexdigest()
    assert report["env"] == hashlib.sha256(b"tok-1234567890").hexdigest()


async def test_a_failing_hook_reports_its_exit_code_and_output(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    result, lines = await run(runtime, hook_spec(hook_artifact(tmp_path)), "fail")
    assert result.exit_code == 3
    assert not result.timed_out
    assert lines == ["migrating", "boom: relation exists"]  # stdout and stderr, in order


async def test_a_hook_past_its_timeout_is_killed(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    marker = uuid.uuid4().hex
    result, lines = await run(
        runtime, hook_spec(hook_artifact(tmp_path)), "sleep", marker, timeout=1.0
    )
    assert result.timed_out is True
    assert result.exit_code is None
    assert lines == ["sleeping"]
    assert not _running_with(marker)  # the whole process group was killed


async def test_a_hook_whose_caller_goes_away_is_killed(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    """The control plane died or gave up (an abort cancels the step): the hook ends too."""
    _, runtime = agent
    marker = uuid.uuid4().hex
    first = asyncio.Event()
    job = asyncio.create_task(
        runtime.run_hook(
            hook_spec(hook_artifact(tmp_path)),
            HookRun("pre_deploy", ["python3", "hook.py", "sleep", marker], 600),
            lambda _: first.set(),
        )
    )
    await first.wait()
    assert _running_with(marker)
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job

    async def gone() -> bool:
        return not _running_with(marker)

    await eventually(gone, what="the hook killed")


def _running_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        found.append(int(entry.name))
    return found


class _Go:
    """Answers ``go`` once ``open`` was called, ``wait`` before: a hook that waits for it can
    only finish if the test saw its first line while it ran."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        opened = self.opened

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"go" if opened.is_set() else b"wait"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def go() -> Iterator[_Go]:
    g = _Go()
    yield g
    g.close()


async def test_output_arrives_while_the_hook_runs(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path, go: _Go
) -> None:
    _, runtime = agent
    lines: list[str] = []

    def seen(line: str) -> None:
        lines.append(line)
        if line == "waiting for the go":
            go.opened.set()

    result = await runtime.run_hook(
        hook_spec(hook_artifact(tmp_path)),
        HookRun("pre_deploy", ["python3", "hook.py", "wait-for", go.url], 60.0),
        seen,
    )
    # Had the output come only at the end, the hook would have waited until its timeout.
    assert result.exit_code == 0 and not result.timed_out
    assert lines == ["waiting for the go", "went"]


async def test_an_artifact_changed_after_signing_is_refused_before_it_runs(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    artifact = hook_artifact(tmp_path)
    spec = hook_spec(artifact)
    artifact.chmod(0o755)
    (artifact / "hook.py").chmod(0o644)
    (artifact / "hook.py").write_text(HOOK + "\nprint('changed')\n")
    with pytest.raises(ArtifactVerificationFailed, match="digest check failed"):
        await run(runtime, spec, "env", "/nonexistent")


async def test_an_unsigned_artifact_is_refused(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    spec = replace(hook_spec(hook_artifact(tmp_path)), provenance=None)
    lines: list[str] = []
    with pytest.raises(ArtifactVerificationFailed) as refused:
        await runtime.run_hook(spec, HookRun("pre_deploy", ["python3", "hook.py", "env"], 9), print)
    assert refused.value.detail["reason"] == "unsigned"
    assert lines == []


async def test_a_command_that_does_not_exist_cannot_start(
    agent: tuple[Agent, LocalRuntime], tmp_path: Path
) -> None:
    _, runtime = agent
    spec = hook_spec(hook_artifact(tmp_path))
    with pytest.raises(RevisionStartFailed, match="no-such-migrate"):
        await runtime.run_hook(spec, HookRun("pre_deploy", ["no-such-migrate"], 9), print)


# --- an image: a one-off container of the candidate image ---------------------------------------

IMAGE_HOOK = """\
import json, os, sys
print(json.dumps({"environ": dict(os.environ), "uid": os.getuid()}), flush=True)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.docker
async def test_an_image_hook_runs_as_a_one_off_container(
    tmp_path: Path, docker_engine: str, python_base_image: str
) -> None:
    """``python_base_image``: the image is built on it."""
    client = docker.DockerClient(base_url=docker_engine)
    try:
        image_id = build_app_image(
            client, tmp_path / "ctx", {"app.py": IMAGE_HOOK}, "shipyard-test/hook:v1",
            command=["python3", "app.py", "0"],
        )  # fmt: skip
        statement = signing.provenance_statement(
            subject_name="svc",
            subject_digest=image_id,
            builder_id="urn:shipyard:builder:test",
            source_repository=None,
            commit="0" * 40,
            build_command=None,
        )
        spec = RevisionSpec(
            service="svc",
            revision="v2",
            artifact_digest=image_id,
            artifact_location="shipyard-test/hook:v1",
            argv=["python3", "app.py", "0"],
            env={"GREETING": "hello"},
            artifact_kind="oci-image",
            provenance=signing.sign_statement(SIGNER, statement),
        )
        lines: list[str] = []
        async with served_agent(tmp_path / "data", docker_host=docker_engine) as (_, runtime):
            result = await runtime.run_hook(
                spec, HookRun("pre_deploy", ["python3", "app.py", "4"], 120), lines.append
            )
        assert result.exit_code == 4
        report = json.loads(lines[0])
        assert report["environ"]["SHIPYARD_HOOK"] == "pre_deploy"
        assert report["environ"]["GREETING"] == "hello"
        assert "PORT" not in report["environ"]
        assert report["uid"] != 0
        # One-off: nothing of it is left on the engine.
        left = client.containers.list(all=True, filters={"ancestor": image_id})
        assert left == []
    finally:
        client.close()
