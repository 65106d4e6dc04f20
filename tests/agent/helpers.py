"""What the agent's supervisor tests share: artifacts of ``replica_app.py``, specs signed the way
the security gate signs them (the agent starts nothing else), waiting for a condition with a
deadline, and looking at processes from the outside."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx

from shipyard.agent.api import build_app
from shipyard.agent.server import Agent
from shipyard.build.digest import digest_tree
from shipyard.runtime.base import RevisionSpec
from shipyard.security import signing

T = TypeVar("T")

REPLICA_APP = Path(__file__).with_name("replica_app.py")

#: The tests' stand-in for the control plane's signing key; agents under test trust its public
#: half (``Agent(..., trusted_key=TRUSTED_KEY)``).
SIGNER = signing.Ed25519Signer.generate()
TRUSTED_KEY = SIGNER.public_key_pem()

#: Polling interval for conditions; the deadline is what bounds a test, not this.
POLL = 0.02


def make_artifact(root: Path, version: str) -> Path:
    """An artifact directory holding the replica app, read-only like the builder leaves it."""
    d = root / f"artifact-{version}"
    d.mkdir(parents=True)
    (d / "app.py").write_text(REPLICA_APP.read_text())
    (d / "helper.py").write_text(f"VALUE = {version!r}\n")
    for p in (d / "app.py", d / "helper.py", d):
        p.chmod(0o555 if p.is_dir() else 0o444)
    return d


def spec_for(
    artifact: Path,
    revision: str = "v1",
    *,
    service: str = "svc",
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    health_endpoint: str | None = None,
) -> RevisionSpec:
    return sign(
        RevisionSpec(
            service=service,
            revision=revision,
            artifact_digest="sha256:" + "0" * 64,
            artifact_location=str(artifact),
            argv=argv or ["python3", "app.py"],
            env=env or {},
            health_endpoint=health_endpoint,
        )
    )


def sign(spec: RevisionSpec, signer: signing.Signer = SIGNER) -> RevisionSpec:
    """``spec`` with its artifact's real digest and a DSSE envelope over provenance for it, as
    the security gate writes and ``orchestrator.artifacts.spec`` attaches."""
    digest = digest_tree(Path(spec.artifact_location))
    statement = signing.provenance_statement(
        subject_name=spec.service,
        subject_digest=digest,
        builder_id="urn:shipyard:builder:test",
        source_repository=None,
        commit="0" * 40,
        build_command=None,
    )
    envelope = signing.sign_statement(signer, statement)
    return replace(spec, artifact_digest=digest, provenance=envelope)


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something other than None (or False); fail at the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(POLL)


async def get_info(port: int) -> dict[str, Any] | None:
    """The replica app's ``/info``, or None while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2, trust_env=False) as c:
            r = await c.get(f"http://127.0.0.1:{port}/info")
    except httpx.TransportError:
        return None
    info: dict[str, Any] = json.loads(r.text)
    return info


def app_host_pid(group: int, marker: str = "app.py") -> int:
    """The host pid of the app in replica process group ``group`` (the supervisor's process is
    the sandbox's monitor; the app inside has its own PID namespace and reports pid 2)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if (
            int(fields[2]) == group
            and b"bwrap" not in cmdline[0]
            and any(marker.encode() in arg for arg in cmdline)
        ):
            return int(entry.name)
    raise AssertionError(f"no process running {marker} in process group {group}")


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts: it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone_blocking(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` has exited *without yielding to the event loop*, so an in-process
    supervisor cannot react to the exit before the caller has acted on it."""
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running after {timeout:g}s")
        time.sleep(0.005)


#: The overlay needs CAP_SYS_ADMIN; without root the supervisor runs replicas directly.
NOT_ROOT = os.geteuid() != 0


class StartCounter:
    """Counts the starts of a sandboxed test app over HTTP (``GET /`` answers the count, this
    start included), for ``replica_app.py``'s ``START_URL``. Use as a context manager."""

    def __init__(self) -> None:
        count = [0]
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    count[0] += 1
                    body = str(count[0]).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._count = count
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def starts(self) -> int:
        return self._count[0]

    def __enter__(self) -> StartCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def agent_client(a: Agent) -> httpx.AsyncClient:
    """An in-process client of ``a``'s API, authenticated with its token."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(a)),
        base_url="http://agent",
        headers={"authorization": f"Bearer {a.token}"},
    )


@contextlib.asynccontextmanager
async def running_agent(
    data_dir: Path, **options: Any
) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    """An ``Agent`` for region ``local`` trusting the test key, with its client; both closed
    at the end. ``options`` go to ``Agent`` (``restart=``, ...)."""
    a = Agent(data_dir, "local", trusted_key=TRUSTED_KEY, **options)
    client = agent_client(a)
    try:
        yield a, client
    finally:
        await client.aclose()
        await a.close()
