"""One contract, every Runtime: the in-memory fake the orchestrator tests rely on must behave like
the real local agent (started here for real, running ``contract_app.py`` as its replicas).

A harness per backend gives the suite what it needs besides the ``Runtime`` protocol: sending a
request through the service's stable URL (and seeing which revision and replica answered),
holding one there until released, and making a replica's process exit. The assertions are the
same for both: weights and their verification, sticky assignment, per-revision metrics, draining
on stop, ``set_routable``, restarts and crash loops with their exit codes, what serves after
a revision loses its replicas, and that a revision whose artifact is not what its digest says is
refused (the agent verifies signature and digest itself; the local harness signs its artifacts
with the key the agent trusts, ``<data_dir>/keys/signing.pub``, as ``shipyard serve`` does).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import threading
import urllib.parse
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import docker
import httpx
import pytest

from shipyard.agent.containers import label
from shipyard.errors import (
    ArtifactVerificationFailed,
    InvalidInput,
    NotFound,
    RevisionStartFailed,
    ShipyardError,
    TrafficSwitchFailed,
)
from shipyard.runtime.base import (
    EntrySpec,
    LoadDriver,
    LogBatch,
    LogQuery,
    LogStream,
    ReplicaStatus,
    RevisionSpec,
    Runtime,
    StickyKey,
)
from shipyard.runtime.fake import FakeExchange, FakeRuntime
from shipyard.runtime.local import LocalRuntime, read_agent_info
from shipyard.security import signing
from shipyard.security.signing import Ed25519Signer
from tests.agent.helpers import eventually, sign
from tests.images import BASE_TAG, build_app_image

APP = Path(__file__).with_name("contract_app.py")
SERVICE = "svc"


@dataclass(frozen=True)
class Answer:
    """What a client of the service's stable URL saw."""

    status: int
    #: Which revision and replica answered; None when the router answered itself (503).
    revision: str | None
    replica_id: str | None


class Held(Protocol):
    replica_id: str

    async def release(self) -> Answer: ...


class Harness(Protocol):
    @property
    def runtime(self) -> Runtime: ...

    async def start(self, revision: str, replicas: int = 1) -> list[ReplicaStatus]:
        """Start the revision and wait until its replicas answer (the health gate's job)."""
        ...

    def spec(self, revision: str, replicas: int = 1) -> RevisionSpec:
        """The revision as the control plane would ask for it (artifact built and signed)."""
        ...

    def modify_artifact(self, spec: RevisionSpec) -> None:
        """Change the artifact's content after it was signed (what a tamperer would do)."""
        ...

    @property
    def tampered(self) -> tuple[str, str]:
        """``(check, reason)`` of the refusal of a modified artifact."""
        ...

    @property
    def patience(self) -> float:
        """Seconds to wait for what takes several replica starts (a crash loop): a container
        on the test engine's vfs storage takes seconds to create, a process milliseconds."""
        ...

    async def send(self, *, headers: Mapping[str, str] | None = None, status: int = 200) -> Answer:
        """One request through the service URL; the replica answers ``status``."""
        ...

    async def hold(self) -> Held:
        """A request that has reached a replica and is held there until released."""
        ...

    async def exit(self, replica: ReplicaStatus, code: int, *, for_good: bool = False) -> None:
        """The replica's process exits with ``code``; ``for_good``: every restart fails too."""
        ...

    async def say(self, replica: ReplicaStatus, text: str, stream: LogStream) -> None:
        """The replica prints ``text`` as one line on ``stream``."""
        ...


def spec(revision: str, replicas: int, location: str, env: Mapping[str, str]) -> RevisionSpec:
    return RevisionSpec(
        SERVICE,
        revision,
        "sha256:" + "0" * 64,
        location,
        ["python3", "app.py"],
        env,
        replicas,
        health_endpoint="/health",
        # The router's x-shipyard-revision tells the app's answers from the router's own.
        entry=EntrySpec(revision_header=True),
    )


class FakeHarness:
    tampered = ("digest", "content_mismatch")
    patience = 30.0

    def __init__(self) -> None:
        self.runtime = FakeRuntime()  # on the wall clock, with the agent's 0.5 s first backoff

    async def start(self, revision: str, replicas: int = 1) -> list[ReplicaStatus]:
        return await self.runtime.start_revision(self.spec(revision, replicas))

    def spec(self, revision: str, replicas: int = 1) -> RevisionSpec:
        return spec(revision, replicas, f"/nowhere/{revision}", {})

    def modify_artifact(self, spec: RevisionSpec) -> None:
        self.runtime.artifact_digests[spec.artifact_location] = "sha256:" + "f" * 64

    async def send(self, *, headers: Mapping[str, str] | None = None, status: int = 200) -> Answer:
        return _answer(self.runtime.router.send(SERVICE, headers=headers, status=status))

    async def hold(self) -> Held:
        exchange = self.runtime.router.open(SERVICE)
        assert exchange.replica_id is not None, "nothing serves the held request"
        return _FakeHeld(exchange.replica_id, exchange)

    async def exit(self, replica: ReplicaStatus, code: int, *, for_good: bool = False) -> None:
        if for_good:
            self.runtime.crashing[replica.revision] = code
        self.runtime.kill_replica(replica.replica_id, exit_code=code)

    async def say(self, replica: ReplicaStatus, text: str, stream: LogStream) -> None:
        self.runtime.print(replica.replica_id, text, stream)


@dataclass
class _FakeHeld:
    replica_id: str
    exchange: FakeExchange

    async def release(self) -> Answer:
        self.exchange.finish(200)
        return _answer(self.exchange)


def _answer(exchange: FakeExchange) -> Answer:
    assert exchange.status is not None
    return Answer(exchange.status, exchange.revision, exchange.replica_id)


class LocalHarness:
    tampered = ("digest", "content_mismatch")
    patience = 30.0

    def __init__(self, runtime: LocalRuntime, tmp: Path) -> None:
        self.runtime = runtime
        self._tmp = tmp
        self.crashing: set[str] = set()
        self._state = _StateServer(self.crashing)
        self.client = httpx.AsyncClient(timeout=60, trust_env=False)
        # The control plane's key, where the agent looks for its public half.
        self.signer = Ed25519Signer.load_or_create(tmp / "data")

    def spec(self, revision: str, replicas: int = 1) -> RevisionSpec:
        artifact = self._tmp / f"artifact-{revision}"
        if not artifact.exists():
            artifact.mkdir()
            (artifact / "app.py").write_text(APP.read_text())
        env = {"CONTRACT_STATE_URL": self._state.url}
        return sign(spec(revision, replicas, str(artifact), env), self.signer)

    def modify_artifact(self, spec: RevisionSpec) -> None:
        (Path(spec.artifact_location) / "app.py").write_text(APP.read_text() + "\n# changed\n")

    async def start(self, revision: str, replicas: int = 1) -> list[ReplicaStatus]:
        started = await self.runtime.start_revision(self.spec(revision, replicas))
        for r in started:

            async def answering(port: int = r.port) -> bool:
                return await self._healthy(port)

            await eventually(answering, what=f"{r.replica_id} to answer")
        return started

    async def _healthy(self, port: int) -> bool:
        try:
            return (await self.client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
        except httpx.TransportError:
            return False

    async def _url(self) -> str:
        state = await self.runtime.service_state(SERVICE)
        assert state is not None
        return state.url

    async def send(self, *, headers: Mapping[str, str] | None = None, status: int = 200) -> Answer:
        path = "/" if status == 200 else f"/status/{status}"
        r = await self.client.get(await self._url() + path, headers=dict(headers or {}))
        return _http_answer(r)

    async def hold(self) -> Held:
        hold_id = uuid.uuid4().hex
        request = asyncio.create_task(self.client.get(f"{await self._url()}/hold/{hold_id}"))

        async def holder() -> ReplicaStatus | None:
            assert not request.done(), request
            state = await self.runtime.service_state(SERVICE)
            assert state is not None
            for r in state.replicas:
                try:
                    held = await self.client.get(f"http://127.0.0.1:{r.port}/holding")
                except httpx.TransportError:
                    continue
                if hold_id in json.loads(held.text):
                    return r
            return None

        replica = await eventually(holder, what="the held request to reach a replica")
        return _LocalHeld(replica.replica_id, replica.port, hold_id, request, self.client)

    async def exit(self, replica: ReplicaStatus, code: int, *, for_good: bool = False) -> None:
        if for_good:
            self.crashing.add(replica.revision)
        with pytest.raises(httpx.TransportError):  # it dies without answering
            await self.client.get(f"http://127.0.0.1:{replica.port}/exit/{code}")

    async def say(self, replica: ReplicaStatus, text: str, stream: LogStream) -> None:
        said = urllib.parse.quote(text, safe="")
        r = await self.client.get(f"http://127.0.0.1:{replica.port}/say/{stream}/{said}")
        assert r.status_code == 200

    async def aclose(self) -> None:
        await self.client.aclose()
        self._state.close()


class _StateServer:
    """What the harness tells the sandboxed contract app: ``GET /crash/<revision>`` is 200 for a
    revision in ``crashing``, else 404 (a thread: the app asks while the test awaits)."""

    def __init__(self, crashing: set[str]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                revision = self.path.removeprefix("/crash/")
                self.send_response(200 if revision in crashing else 404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class _LocalHeld:
    replica_id: str
    port: int
    hold_id: str
    request: asyncio.Task[httpx.Response]
    client: httpx.AsyncClient

    async def release(self) -> Answer:
        await self.client.get(f"http://127.0.0.1:{self.port}/release/{self.hold_id}")
        return _http_answer(await self.request)


def _http_answer(r: httpx.Response) -> Answer:
    revision = r.headers.get("x-shipyard-revision")
    parts = r.text.split()
    if revision is None or len(parts) != 2:  # the router's own answer
        return Answer(r.status_code, None, None)
    assert parts[0] == revision
    return Answer(r.status_code, revision, parts[1])


class DockerHarness(LocalHarness):
    """The local agent running every revision as a container of the session's contract image
    (``contract_image``: contract_app.py on tests/images.py's Python base) on the test engine.
    Each harness tags that image under a name of its own, which ``modify_artifact`` moves to
    another image (a retag after signing)."""

    tampered = ("image", "image_mismatch")
    patience = 120.0

    def __init__(
        self, runtime: LocalRuntime, tmp: Path, client: docker.DockerClient, image: str
    ) -> None:
        super().__init__(runtime, tmp)
        self._docker = client
        self._image = image
        self.location = f"shipyard-test/contract:{uuid.uuid4().hex[:12]}"
        client.images.get(image).tag(self.location)

    def spec(self, revision: str, replicas: int = 1) -> RevisionSpec:
        signed = sign_image(self._image, self.signer)
        return replace(
            spec(revision, replicas, self.location, {"CONTRACT_STATE_URL": self._state.url}),
            artifact_digest=self._image,
            argv=[],  # the image's CMD
            provenance=signed,
            artifact_kind="oci-image",
            stop_timeout=5.0,
        )

    def modify_artifact(self, spec: RevisionSpec) -> None:
        base = self._docker.images.get(BASE_TAG)
        base.tag(spec.artifact_location)


def sign_image(image_id: str, signer: Ed25519Signer) -> dict[str, Any]:
    """The security gate's envelope for an image (its statement names the image ID)."""
    statement = signing.provenance_statement(
        subject_name=SERVICE,
        subject_digest=image_id,
        builder_id="urn:shipyard:builder:test",
        source_repository=None,
        commit="0" * 40,
        build_command=None,
    )
    return dict(signing.sign_statement(signer, statement))


@pytest.fixture(scope="session")
def contract_image(
    docker_engine: str, python_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """contract_app.py as an image (built once per session); its ID."""
    client = docker.DockerClient(base_url=docker_engine)
    try:
        return build_app_image(
            client,
            tmp_path_factory.mktemp("contract-image"),
            {"app.py": APP.read_text()},
            "shipyard-test/contract:app",
            command=["python3", "app.py"],
        )
    finally:
        client.close()


@pytest.fixture(params=["fake", "local", pytest.param("docker", marks=pytest.mark.docker)])
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    if request.param == "fake":
        yield FakeHarness()
        return
    client: docker.DockerClient | None = None
    if request.param == "docker":
        engine: str = request.getfixturevalue("docker_engine")
        image: str = request.getfixturevalue("contract_image")
        # The agent `LocalRuntime.connect` starts takes its engine from DOCKER_HOST.
        monkeypatch.setenv("DOCKER_HOST", engine)
        client = docker.DockerClient(base_url=engine)
    rt = await LocalRuntime.connect(tmp_path / "data", "local")
    local = (
        LocalHarness(rt, tmp_path) if client is None else DockerHarness(rt, tmp_path, client, image)
    )
    try:
        if client is not None:
            assert "oci-image" in rt.artifact_kinds, rt.artifact_kind_problems
        yield local
    finally:
        await local.aclose()
        await rt.aclose()
        found = read_agent_info(tmp_path / "data", "local")
        info = tmp_path / "data" / "agents" / "local" / "agent.json"
        if found and info.exists():
            pid = int(json.loads(info.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
            if client is not None:  # its containers outlive it: wait, then remove them
                await eventually(lambda: _gone(pid), what="the agent exiting")
        if client is not None:
            agent_dir = (tmp_path / "data" / "agents" / "local").resolve()
            for c in client.containers.list(
                all=True, filters={"label": f"{label('agent')}={agent_dir}"}
            ):
                c.remove(force=True)
            client.close()


async def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def replica(runtime: Runtime, replica_id: str) -> ReplicaStatus | None:
    state = await runtime.service_state(SERVICE)
    assert state is not None
    return next((r for r in state.replicas if r.replica_id == replica_id), None)


async def serve(h: Harness, weights: dict[str, int], **sticky: str) -> dict[str, ReplicaStatus]:
    """Start one routable replica of each revision and route ``weights``; revision -> replica."""
    out = {}
    for rev in weights:
        [r] = await h.start(rev)
        await h.runtime.set_routable(SERVICE, [r.replica_id], True)
        out[rev] = r
    await h.runtime.router.set_weight(
        SERVICE, weights, sticky=StickyKey(**sticky) if sticky else None
    )
    return out


async def answers(h: Harness, n: int) -> Counter[str | None]:
    """Where ``n`` requests went, by replica id (None: the router answered 503 itself)."""
    seen: Counter[str | None] = Counter()
    for _ in range(n):
        a = await h.send()
        assert a.status == (200 if a.replica_id else 503), a
        seen[a.replica_id] += 1
    return seen


# --- the service, starting, weights ---------------------------------------------------------------


async def test_service_endpoint_is_stable_and_idempotent(harness: Harness) -> None:
    runtime = harness.runtime
    url = await runtime.ensure_service(SERVICE)
    assert url == await runtime.ensure_service(SERVICE)
    assert SERVICE in await runtime.list_services()
    assert await runtime.service_state("nothere") is None


async def test_start_is_idempotent_and_not_routable_until_told(harness: Harness) -> None:
    first = await harness.start("v1", replicas=2)
    again = await harness.start("v1", replicas=2)
    assert len(first) == 2
    assert {r.replica_id for r in first} == {r.replica_id for r in again}
    assert all(not r.routable for r in first)
    state = await harness.runtime.service_state(SERVICE)
    assert state is not None and state.revisions() == {"v1"}
    assert (await harness.send()).status == 503  # nothing routed yet: the router answers


@pytest.mark.parametrize(
    "weights",
    [
        pytest.param({"v1": 60}, id="sum-below-100"),
        pytest.param({"v1": 100, "v2": -5}, id="negative"),
        pytest.param({"v1": 150}, id="above-100"),
    ],
)
async def test_weights_need_routable_replicas_and_sum_to_100(
    harness: Harness, weights: dict[str, int]
) -> None:
    runtime = harness.runtime
    replicas = await harness.start("v1")
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight(SERVICE, {"v1": 100})  # not routable yet
    await runtime.set_routable(SERVICE, [r.replica_id for r in replicas], True)
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight(SERVICE, weights)
    await runtime.router.set_weight(SERVICE, {"v1": 100})
    assert await runtime.router.verify_weight(SERVICE, {"v1": 100}) is True
    assert await runtime.router.verify_weight(SERVICE, {"v1": 50, "v2": 50}) is False
    state = await runtime.service_state(SERVICE)
    assert state is not None and dict(state.weights) == {"v1": 100}


async def test_weighted_round_robin_is_exact_over_a_cycle(harness: Harness) -> None:
    reps = await serve(harness, {"v2": 30, "v1": 70})

    seen = await answers(harness, 20)

    assert seen == {reps["v2"].replica_id: 6, reps["v1"].replica_id: 14}


async def test_switch_and_stop_revision(harness: Harness) -> None:
    runtime = harness.runtime
    reps = await serve(harness, {"v1": 100})
    [v2] = await harness.start("v2")
    await runtime.set_routable(SERVICE, [v2.replica_id], True)
    await runtime.router.set_weight(SERVICE, {"v2": 100})
    await runtime.stop_revision(SERVICE, "v1", drain_timeout=5)
    await runtime.stop_revision(SERVICE, "v1", drain_timeout=5)  # idempotent
    state = await runtime.service_state(SERVICE)
    assert state is not None and state.revisions() == {"v2"}
    assert await replica(runtime, reps["v1"].replica_id) is None
    assert await harness.send() == Answer(200, "v2", v2.replica_id)


async def test_a_larger_count_starts_only_the_missing_replicas(harness: Harness) -> None:
    """What ``shipyard scale`` relies on (orchestrator/services.py): the new replicas are the
    only ones started, take no traffic until told, and are listed after the older ones."""
    runtime = harness.runtime
    reps = await serve(harness, {"v1": 100})
    old = reps["v1"].replica_id
    more = await harness.start("v1", replicas=3)
    fresh = [r.replica_id for r in more if r.replica_id != old]
    assert len(more) == 3 and len(fresh) == 2
    assert all(not r.routable for r in more if r.replica_id != old)
    state = await runtime.service_state(SERVICE)
    assert state is not None and [r.replica_id for r in state.replicas] == [old, *fresh]
    assert set(await answers(harness, 6)) == {old}
    await runtime.set_routable(SERVICE, fresh, True)
    assert set(await answers(harness, 6)) == {old, *fresh}


async def test_removing_the_route_stops_every_replica(harness: Harness) -> None:
    """What ``shipyard service delete`` ends with."""
    runtime = harness.runtime
    await serve(harness, {"v1": 100})
    await harness.start("v2")
    await runtime.router.remove_managed_routes(SERVICE)
    assert await runtime.service_state(SERVICE) is None
    assert SERVICE not in await runtime.list_services()


async def test_a_command_that_cannot_start_is_refused(harness: Harness) -> None:
    runtime = harness.runtime
    if isinstance(runtime, FakeRuntime):
        runtime.fail_start.add("bad")
    bad = harness.spec("bad")
    with pytest.raises(RevisionStartFailed):
        await runtime.start_revision(
            RevisionSpec.from_dict({**bad.to_dict(), "argv": ["/no/binary"]})
        )
    state = await runtime.service_state(SERVICE)
    assert state is None or "bad" not in state.revisions()


async def test_a_revision_whose_artifact_digest_does_not_match_is_refused(
    harness: Harness,
) -> None:
    runtime = harness.runtime
    await serve(harness, {"v1": 100})
    changed = harness.spec("v2")
    harness.modify_artifact(changed)
    with pytest.raises(ArtifactVerificationFailed, match="digest") as refused:
        await runtime.start_revision(changed)
    assert (refused.value.detail["check"], refused.value.detail["reason"]) == harness.tampered
    assert refused.value.detail["actual"] != changed.artifact_digest
    state = await runtime.service_state(SERVICE)
    assert state is not None and state.revisions() == {"v1"}  # nothing of v2 started
    assert await runtime.router.verify_weight(SERVICE, {"v1": 100}) is True


# --- sticky assignment -------------------------------------------------------------------------


def bucket_of(key: str, canary_percent: int) -> str:
    """The documented rule: crc32 of the key, mod 100, below the canary's share -> canary."""
    return "v2" if zlib.crc32(key.encode()) % 100 < canary_percent else "v1"


async def test_sticky_users_stay_on_their_revision(harness: Harness) -> None:
    reps = await serve(harness, {"v2": 30, "v1": 70}, header="x-user")
    by_replica = {r.replica_id: rev for rev, r in reps.items()}
    users = [f"user-{n}" for n in range(40)]

    async def revision_of(user: str, header: str = "x-user") -> str:
        a = await harness.send(headers={header: user})
        assert a.status == 200 and a.replica_id is not None, a
        return by_replica[a.replica_id]

    first = {u: await revision_of(u, "X-User") for u in users}
    again = {u: await revision_of(u) for u in users}

    assert first == again == {u: bucket_of(u, 30) for u in users}
    assert set(first.values()) == {"v1", "v2"}  # the sample covers both
    # Raising the canary only moves users onto it.
    await harness.runtime.router.set_weight(
        SERVICE, {"v2": 60, "v1": 40}, sticky=StickyKey(header="x-user")
    )
    later = {u: await revision_of(u) for u in users}
    assert later == {u: bucket_of(u, 60) for u in users}
    assert {u for u in users if first[u] == "v2"} < {u for u in users if later[u] == "v2"}
    # Without the key, requests are spread by weight as usual.
    assert await answers(harness, 10) == {reps["v2"].replica_id: 6, reps["v1"].replica_id: 4}


async def test_a_sticky_cookie_names_the_cookie_whose_value_is_hashed(harness: Harness) -> None:
    reps = await serve(harness, {"v2": 50, "v1": 50}, cookie="session")
    by_replica = {r.replica_id: rev for rev, r in reps.items()}

    for n in range(20):
        user = f"u{n}"
        a = await harness.send(headers={"cookie": f"theme=dark; session={user}; x=1"})
        assert a.replica_id is not None and by_replica[a.replica_id] == bucket_of(user, 50)


async def test_an_invalid_sticky_name_is_refused_and_changes_nothing(harness: Harness) -> None:
    await serve(harness, {"v1": 100})
    [v2] = await harness.start("v2")
    await harness.runtime.set_routable(SERVICE, [v2.replica_id], True)

    with pytest.raises(TrafficSwitchFailed):
        await harness.runtime.router.set_weight(
            SERVICE, {"v2": 50, "v1": 50}, sticky=StickyKey(header="x user")
        )

    assert await harness.runtime.router.verify_weight(SERVICE, {"v1": 100}) is True


# --- per-revision metrics ----------------------------------------------------------------------


async def test_requests_are_counted_per_revision(harness: Harness) -> None:
    await serve(harness, {"v1": 100})
    for status in (200, 200, 200, 404, 503, 503):
        assert (await harness.send(status=status)).status == status

    m = (await harness.runtime.router.metrics(SERVICE))["v1"]
    assert (m["requests"], m["status_2xx"], m["status_4xx"], m["status_5xx"]) == (6, 3, 1, 2)
    assert (m["status_3xx"], m["upstream_errors"], m["inflight"]) == (0, 0, 0)
    assert sum(m["latency_ms"]["buckets"].values()) == 6
    assert m["success_rate"] == pytest.approx(4 / 6)

    held = await harness.hold()
    during = (await harness.runtime.router.metrics(SERVICE))["v1"]
    assert (during["requests"], during["inflight"]) == (6, 1)
    assert (await held.release()).status == 200
    after = (await harness.runtime.router.metrics(SERVICE))["v1"]
    assert (after["requests"], after["status_2xx"], after["inflight"]) == (7, 4, 0)


async def test_the_built_in_load_reaches_only_its_revision_until_stopped(
    harness: Harness,
) -> None:
    await serve(harness, {"v2": 20, "v1": 80})
    router = harness.runtime.router
    assert isinstance(router, LoadDriver)
    started = await router.drive_load(SERVICE, "v2", 100, "/", lease_seconds=30)
    assert (started["revision"], started["rps"], started["path"]) == ("v2", 100, "/")

    async def counted() -> int | None:
        m = await router.metrics(SERVICE)
        n = int(m.get("v2", {}).get("requests", 0))
        return n if n >= 20 else None

    await eventually(counted, what="20 load requests counted for v2")
    stopped = await router.stop_load(SERVICE)
    assert stopped is not None
    assert (stopped["revision"], stopped["running"]) == ("v2", False)
    assert await router.stop_load(SERVICE) is None  # idempotent
    m = await router.metrics(SERVICE)
    assert m.get("v1", {}).get("requests", 0) == 0  # stable got none of it
    with pytest.raises(ShipyardError):
        await router.drive_load("nothere", "v2", 10, "/", lease_seconds=30)


# --- routable, draining ------------------------------------------------------------------------


async def test_an_unroutable_replica_gets_no_new_requests(harness: Harness) -> None:
    runtime = harness.runtime
    a, b = await harness.start("v1", replicas=2)
    await runtime.set_routable(SERVICE, [a.replica_id, b.replica_id], True)
    await runtime.router.set_weight(SERVICE, {"v1": 100})

    await runtime.set_routable(SERVICE, [a.replica_id], False)

    assert await answers(harness, 6) == {b.replica_id: 6}
    after = await replica(runtime, a.replica_id)
    assert after is not None and (after.state, after.routable) == ("running", False)
    await runtime.set_routable(SERVICE, [a.replica_id], True)
    assert await answers(harness, 4) == {a.replica_id: 2, b.replica_id: 2}


async def test_set_routable_refuses_a_replica_it_does_not_run(harness: Harness) -> None:
    [a] = await harness.start("v1")

    with pytest.raises(InvalidInput):
        await harness.runtime.set_routable(SERVICE, [a.replica_id, "v1-nope"], True)

    after = await replica(harness.runtime, a.replica_id)
    assert after is not None and not after.routable  # nothing changed, not even the known one


async def test_stopping_a_replica_lets_its_requests_finish_and_sends_it_no_new_ones(
    harness: Harness,
) -> None:
    runtime = harness.runtime
    a, b = await harness.start("v1", replicas=2)
    await runtime.set_routable(SERVICE, [a.replica_id], True)
    await runtime.router.set_weight(SERVICE, {"v1": 100})
    held = await harness.hold()
    assert held.replica_id == a.replica_id  # the only one in rotation
    await runtime.set_routable(SERVICE, [b.replica_id], True)

    stopping = asyncio.create_task(runtime.stop_replicas(SERVICE, [a.replica_id], drain_timeout=30))

    async def out_of_rotation() -> bool:
        r = await replica(runtime, a.replica_id)
        return r is not None and not r.routable

    await eventually(out_of_rotation, what="the stopping replica to leave rotation")
    assert await answers(harness, 4) == {b.replica_id: 4}
    assert await replica(runtime, a.replica_id) is not None  # still there: draining
    assert not stopping.done()
    assert await held.release() == Answer(200, "v1", a.replica_id)
    await asyncio.wait_for(stopping, 30)
    assert await replica(runtime, a.replica_id) is None


# --- replicas that die -------------------------------------------------------------------------


async def test_a_replica_that_dies_is_restarted_and_counted(harness: Harness) -> None:
    runtime = harness.runtime
    reps = await serve(harness, {"v2": 50, "v1": 50})
    before = reps["v2"]
    await harness.exit(before, 7)

    async def restarted() -> ReplicaStatus | None:
        r = await replica(runtime, before.replica_id)
        assert r is not None
        return r if r.restarts and r.routable else None

    after = await eventually(restarted, what="the replica to be restarted")
    assert (after.replica_id, after.revision, after.restarts) == (before.replica_id, "v2", 1)
    assert (after.state, after.exit_code, after.last_exit_code) == ("running", None, 7)
    assert after.next_restart_in is None
    # The weights asked for serve again, and the restarted replica answers.
    assert await runtime.router.verify_weight(SERVICE, {"v2": 50, "v1": 50}) is True
    assert before.replica_id in await answers(harness, 4)
    # Starting the revision again does not add a replica beside the restarted one.
    assert [r.replica_id for r in await harness.start("v2")] == [before.replica_id]


async def test_a_crash_loop_is_reported_with_its_exit_code(harness: Harness) -> None:
    runtime = harness.runtime
    reps = await serve(harness, {"v1": 100})
    a = reps["v1"]
    await harness.exit(a, 3, for_good=True)

    async def looping() -> ReplicaStatus | None:
        r = await replica(runtime, a.replica_id)
        assert r is not None
        waiting = r.next_restart_in is not None and r.next_restart_in >= 1.0
        return r if r.state == "crashed" and r.restarts >= 2 and waiting else None

    down = await eventually(looping, what="two failed restarts", timeout=harness.patience)
    assert (down.exit_code, down.last_exit_code, down.routable, down.alive) == (3, 3, False, False)
    with pytest.raises(InvalidInput):
        await runtime.set_routable(SERVICE, [a.replica_id], True)  # it cannot take traffic
    assert (await harness.send()).status == 503
    assert await runtime.router.verify_weight(SERVICE, {"v1": 100}) is False
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight(SERVICE, {"v1": 100})
    state = await runtime.service_state(SERVICE)
    assert state is not None and dict(state.weights) == {"v1": 0}


@pytest.mark.parametrize("how", ["stopped", "crash-looping"])
async def test_what_serves_after_a_revision_loses_its_replicas(harness: Harness, how: str) -> None:
    runtime = harness.runtime
    reps = await serve(harness, {"v2": 50, "v1": 50})
    lost = reps["v2"]
    if how == "stopped":
        await runtime.stop_replicas(SERVICE, [lost.replica_id], drain_timeout=5)
    else:
        await harness.exit(lost, 3, for_good=True)

        async def down() -> bool:
            r = await replica(runtime, lost.replica_id)
            return r is not None and r.state == "crashed"

        await eventually(down, what="the replica to crash")

    state = await runtime.service_state(SERVICE)
    assert state is not None and dict(state.weights) == {"v2": 0, "v1": 100}
    assert await runtime.router.verify_weight(SERVICE, {"v2": 50, "v1": 50}) is False
    assert await runtime.router.verify_weight(SERVICE, {"v1": 100}) is True
    assert await answers(harness, 6) == {reps["v1"].replica_id: 6}
    with pytest.raises(TrafficSwitchFailed):
        await runtime.router.set_weight(SERVICE, {"v2": 50, "v1": 50})
    await runtime.router.set_weight(SERVICE, {"v1": 100})
    assert await runtime.router.verify_weight(SERVICE, {"v1": 100}) is True


# --- logs ----------------------------------------------------------------------------------------


async def _said(h: Harness, query: LogQuery, *texts: str) -> LogBatch:
    """The batch for ``query`` once every one of ``texts`` is in it (the agent stores a line a
    moment after the app prints it)."""

    async def arrived() -> LogBatch | None:
        batch = await h.runtime.read_logs(SERVICE, query)
        seen = {line.text for line in batch.lines}
        return batch if seen.issuperset(texts) else None

    return await eventually(arrived, what=f"{texts} in the log")


async def test_logs_keep_streams_apart_follow_by_cursor_and_outlive_the_replica(
    harness: Harness,
) -> None:
    runtime = harness.runtime
    [r] = await harness.start("v1")
    await harness.say(r, "hello [bold]world[/bold]", "stdout")
    await harness.say(r, "Traceback (most recent call last):", "stderr")
    batch = await _said(harness, LogQuery(), "hello [bold]world[/bold]",
                        "Traceback (most recent call last):")  # fmt: skip
    said = {line.text: line for line in batch.lines}
    assert said["hello [bold]world[/bold]"].stream == "stdout"
    assert said["Traceback (most recent call last):"].stream == "stderr"
    assert {(line.replica_id, line.revision) for line in batch.lines} == {(r.replica_id, "v1")}
    stamps = [line.timestamp for line in batch.lines]
    assert stamps == sorted(stamps)
    # After the cursor: nothing, then only what is printed next.
    assert (await runtime.read_logs(SERVICE, LogQuery(after=batch.cursor))).lines == []
    await harness.say(r, "later", "stdout")
    later = await _said(harness, LogQuery(after=batch.cursor), "later")
    assert [line.text for line in later.lines] == ["later"]
    tail = await runtime.read_logs(SERVICE, LogQuery(tail=1))
    assert [line.text for line in tail.lines] == ["later"]
    # A stopped replica's log is still there; what names nothing is NotFound.
    await runtime.stop_revision(SERVICE, "v1", drain_timeout=1)
    kept = await runtime.read_logs(SERVICE, LogQuery(revision="v1", replica_id=r.replica_id))
    assert [line.text for line in kept.lines][-1] == "later"
    for query in (LogQuery(revision="v9"), LogQuery(replica_id="v1-999")):
        with pytest.raises(NotFound):
            await runtime.read_logs(SERVICE, query)
    with pytest.raises(NotFound):
        await runtime.read_logs("nothere", LogQuery())
