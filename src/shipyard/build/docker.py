"""``DockerBuilder``: builds a commit into an OCI image with Docker Engine (Docker SDK).

Chosen by ``[build] builder = "docker"`` through ``registry.builder_for``. Steps:

1. Resolve the source (``source.resolve_source``). Images are labelled with an input key over
   the commit's tree, the Dockerfile path and this builder's configuration; an image carrying the
   key is the result of a no-op rebuild (one ``images.list`` call, nothing sent to the engine).
2. Export the commit's tree: that tree, and nothing else, is the build context.
3. Resolve the Dockerfile (``source.dockerfile``, else ``[build] dockerfile``, else
   ``Dockerfile``) inside the tree: symlinks are followed and must stay inside it.
4. Build with the engine's build API; every output line goes to the request's log sink and the
   per-build log; Docker's own layer cache does the caching ("Using cache" lines are counted).
   ``BuildRequest.no_cache`` skips step 1's lookup and builds with ``nocache`` (no layer from
   the cache; base images are still those the engine has unless ``pull`` is set). The new image
   carries the input key too; the newest image with a key is the one a later build reuses.
5. The image id (``sha256:...``, the digest of the image configuration) is the artifact digest;
   the image is tagged ``<repository_prefix>/<service>:<commit[:12]>``.
6. With a ``registry`` configured (``shipyard serve --registry``), the image is also tagged
   ``<registry>/<repository_prefix>/<service>:<commit[:12]>`` and pushed, after a build and after
   a cache hit alike (a push of what the registry already holds only checks the layers:
   ~0.1 s for a 34 MiB image in bench/bench_registry.py);
   the artifact's location is then ``<registry>/<prefix>/<service>@sha256:<manifest digest>``,
   a reference by digest that no later push under the tag can redirect, while its digest stays
   the image id (see docs/architecture.md, "Images on other hosts").

The SDK is blocking: it runs in a worker thread, lines cross to the event loop through a queue.
On timeout the connection is closed, which makes the engine cancel the build. Every docker /
requests exception becomes ``BuildFailed`` (``raise ... from exc``, bodies cut to a sane length).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shipyard.build.base import Artifact, BuildRequest, CacheReport
from shipyard.build.running import BuildLog
from shipyard.build.source import (
    ResolvedSource,
    export_commit,
    manifest_of,
    read_manifest_at,
    resolve_source,
)
from shipyard.domain.manifest import Manifest, load_manifest
from shipyard.errors import BuildFailed, InvalidInput, ShipyardError, SourceError
from shipyard.logs import SecretMasker

INPUTS_LABEL = "dev.shipyard.inputs"
_CACHE_FORMAT = "docker-v1"
_MAX_ERROR_CHARS = 800


class DockerBuilderConfig(BaseModel):
    """Server-side settings of the Docker builder (the registry's config model for "docker")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["docker"] = "docker"
    #: Engine address, e.g. "unix:///var/run/docker.sock"; None: DOCKER_HOST or the default.
    base_url: str | None = None
    repository_prefix: str = Field(default="shipyard", pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$")
    #: Pull newer base images on every build (off: builds use what the engine has).
    pull: bool = False
    #: Seconds for a single engine API call other than the build stream.
    api_timeout_seconds: float = Field(default=60.0, gt=0)
    #: Push every image here, e.g. "127.0.0.1:5000" or "registry.example.com/team" (host[:port]
    #: [/path], no scheme); None: images stay in the engine that built them.
    registry: str | None = None

    @field_validator("registry")
    @classmethod
    def _registry_is_a_reference_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_registry(value)
        except InvalidInput as exc:  # pydantic reports ValueErrors, with the field's name
            raise ValueError(exc.message) from exc


@dataclass
class _Outcome:
    image_id: str | None = None
    error: str | None = None
    cached_steps: int = 0
    steps: int = 0


class DockerBuilder:
    kind = "docker"

    def __init__(
        self,
        data_dir: Path,
        config: DockerBuilderConfig | None = None,
        *,
        shared_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: Where logs/ go (``serve --shared-dir``); the data directory without.
        self.shared_dir = shared_dir or data_dir
        self.config = config or DockerBuilderConfig()
        self._builds = data_dir / "builds"
        self._logs = self.shared_dir / "logs"
        self._builds.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)

    async def build(self, request: BuildRequest) -> Artifact:
        started = time.monotonic()
        durations: dict[str, int] = {}
        log_path = self._logs / f"docker-{time.time_ns()}.log"
        with BuildLog(
            log_path,
            request.log_sink,
            mask=SecretMasker.from_data_dir(self.data_dir, shared_dir=self.shared_dir),
            max_bytes=request.max_log_bytes,
        ) as log:
            try:
                resolved = await resolve_source(request.source, cache_dir=self.data_dir)
                durations["fetch"] = _ms(started)
                dockerfile_hint = request.source.dockerfile
                key = self._inputs_key(resolved.tree, dockerfile_hint)
                if request.no_cache:
                    log.note("no_cache requested: not reusing an image or the layer cache")
                hit = None if request.no_cache else await self._call(self._find_image, key)
                if hit is not None:
                    manifest = await read_manifest_at(resolved)
                    tag = await self._call(self._tag, hit, manifest, resolved.commit)
                    log.note(f"cache hit: tree {resolved.tree} was already built as {hit}")
                    if self.config.registry is not None:
                        tag = await self._push(hit, manifest, resolved.commit, log, durations)
                    durations["total"] = _ms(started)
                    return self._artifact(hit, tag, resolved, manifest, durations, log, hit=True)
                return await self._build(
                    resolved,
                    dockerfile_hint,
                    key,
                    log,
                    started,
                    durations,
                    no_cache=request.no_cache,
                )
            except ShipyardError as exc:
                log.note(f"build failed: {exc.message}")
                exc.detail.setdefault("log_path", str(log_path))
                raise

    async def _build(
        self,
        resolved: ResolvedSource,
        dockerfile_hint: str | None,
        key: str,
        log: BuildLog,
        started: float,
        durations: dict[str, int],
        *,
        no_cache: bool = False,
    ) -> Artifact:
        root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="d-", dir=self._builds))
        context = root / "context"
        try:
            t = time.monotonic()
            await export_commit(resolved, context)
            with manifest_of(resolved):
                manifest = await asyncio.to_thread(load_manifest, context)
            dockerfile = await asyncio.to_thread(
                dockerfile_in,
                context,
                dockerfile_hint or manifest.build.dockerfile or "Dockerfile",
            )
            durations["checkout"] = _ms(t)
            t = time.monotonic()
            outcome = await self._stream_build(
                context, dockerfile, key, manifest, log, no_cache=no_cache
            )
            durations["build"] = _ms(t)
        finally:
            await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)
        if outcome.error is not None or outcome.image_id is None:
            tail = "\n".join(log.tail[-10:])
            raise BuildFailed(
                f"docker build failed: {_cut(outcome.error or 'the engine reported no image')}"
                + (f"; last output:\n{tail}" if tail else ""),
                log_tail=log.tail,
            )
        tag = await self._call(self._tag, outcome.image_id, manifest, resolved.commit)
        if self.config.registry is not None:
            tag = await self._push(outcome.image_id, manifest, resolved.commit, log, durations)
        durations["total"] = _ms(started)
        log.note(
            f"built {outcome.image_id} as {tag} in {durations['total']} ms "
            f"({outcome.cached_steps}/{outcome.steps} steps from the layer cache)"
        )
        return self._artifact(
            outcome.image_id,
            tag,
            resolved,
            manifest,
            durations,
            log,
            hit=False,
            outcome=outcome,
            no_cache=no_cache,
        )

    async def _stream_build(
        self,
        context: Path,
        dockerfile: str,
        key: str,
        manifest: Manifest,
        log: BuildLog,
        *,
        no_cache: bool,
    ) -> _Outcome:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()
        outcome = _Outcome()
        streams: list[Any] = []
        client = await self._call(self._client)

        def emit(line: str | None) -> None:
            if stop.is_set():
                return  # the build was abandoned; nobody reads the queue any more
            with contextlib.suppress(RuntimeError):  # the loop may be gone
                loop.call_soon_threadsafe(queue.put_nowait, line)

        def work() -> None:
            try:
                stream = client.api.build(
                    path=str(context),
                    dockerfile=dockerfile,
                    rm=True,
                    forcerm=True,
                    decode=True,
                    pull=self.config.pull,
                    nocache=no_cache,
                    labels={INPUTS_LABEL: key},
                    use_config_proxy=False,  # nothing from the server's docker config
                    timeout=manifest.build.timeout_seconds,
                )
                streams.append(stream)
                response = _response_of(stream)
                try:
                    for chunk in stream:
                        _absorb(chunk, outcome, emit)
                finally:
                    if response is not None:
                        response.close()  # docker-py leaves streamed responses open
            except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                if not stop.is_set():
                    outcome.error = f"{type(exc).__name__}: {exc}"
            finally:
                client.close()  # here: after a timeout this thread outlives the build call
                emit(None)

        limit = manifest.build.timeout_seconds
        worker = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            async with asyncio.timeout(limit):
                while (line := await queue.get()) is not None:
                    log.line(line)
                await worker
        except TimeoutError as exc:
            stop.set()
            # Cut the build stream's connection: the engine cancels a build whose client went
            # away, and the worker thread's blocking read returns.
            for stream in streams:
                _disconnect(stream)
            raise BuildFailed(
                f"docker build timed out: the build exceeded its timeout of {limit:g} s "
                "([build] timeout_seconds) and was cancelled",
                timeout_seconds=limit,
                log_tail=log.tail,
            ) from exc
        return outcome

    async def _push(
        self,
        image_id: str,
        manifest: Manifest,
        commit: str,
        log: BuildLog,
        durations: dict[str, int],
    ) -> str:
        """Tag ``image_id`` in the registry's namespace, push it, and return the reference by
        manifest digest (``<registry>/<prefix>/<service>@sha256:...``). Lines of the push go to
        the build log as they come; any failure is ``BuildFailed`` naming the registry."""
        registry = self.config.registry
        assert registry is not None  # callers check
        repository = f"{registry}/{self.config.repository_prefix}/{manifest.service.name}"
        tag = commit[:12]
        loop = asyncio.get_running_loop()
        streams: list[Any] = []

        def emit(line: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be gone
                loop.call_soon_threadsafe(log.line, line)

        limit = manifest.build.timeout_seconds
        started = time.monotonic()
        log.note(f"pushing {image_id} to {repository}:{tag}")
        try:
            async with asyncio.timeout(limit):
                digest = await asyncio.to_thread(
                    self._push_blocking, image_id, repository, tag, emit, streams
                )
        except TimeoutError as exc:
            for stream in streams:
                _disconnect(stream)
            raise BuildFailed(
                f"pushing to the registry {registry} timed out after {limit:g} s "
                "([build] timeout_seconds); is the registry reachable from Docker Engine?",
                registry=registry,
                log_tail=log.tail,
            ) from exc
        except (docker.errors.DockerException, requests.RequestException, _PushError) as exc:
            raise BuildFailed(
                f"pushing {repository}:{tag} to the registry {registry} failed: {_cut(str(exc))}",
                registry=registry,
                log_tail=log.tail,
            ) from exc
        durations["push"] = _ms(started)
        reference = f"{repository}@{digest}"
        log.note(f"pushed as {reference} in {durations['push']} ms")
        return reference

    # --- engine calls (blocking; through _call) ---------------------------------------------

    def _push_blocking(
        self, image_id: str, repository: str, tag: str, emit: Any, streams: list[Any]
    ) -> str:
        """The push itself, in a worker thread: the manifest digest the registry stored."""
        client = self._client()
        digest: str | None = None
        try:
            client.images.get(image_id).tag(repository, tag)
            stream = client.api.push(repository, tag=tag, stream=True, decode=True)
            streams.append(stream)
            response = _response_of(stream)
            try:
                for chunk in stream:
                    digest = _absorb_push(chunk, emit) or digest
            finally:
                if response is not None:
                    response.close()
            if digest is None:
                # Older engines print the digest only in a status line; the engine also records
                # it among the image's RepoDigests.
                for entry in client.images.get(image_id).attrs.get("RepoDigests") or []:
                    name, _, candidate = str(entry).partition("@")
                    if name == repository and candidate.startswith("sha256:"):
                        digest = candidate
        finally:
            client.close()
        if digest is None:
            raise _PushError("the engine reported no manifest digest for the push")
        return digest

    def _client(self) -> docker.DockerClient:
        url = self.config.base_url or os.environ.get("DOCKER_HOST", "")
        if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
            # Checked first: docker-py leaks the socket of a failed unix connect.
            raise BuildFailed(f"cannot reach Docker Engine: no socket at {url}")
        if self.config.base_url is None:
            return docker.from_env(timeout=int(self.config.api_timeout_seconds))
        return docker.DockerClient(
            base_url=self.config.base_url, timeout=int(self.config.api_timeout_seconds)
        )

    def _find_image(self, key: str) -> str | None:
        client = self._client()
        try:
            images = client.images.list(filters={"label": f"{INPUTS_LABEL}={key}"})
        finally:
            client.close()
        if not images:
            return None
        # Several after a no-cache rebuild: the newest is what the last build produced.
        return str(max(images, key=_created).id)

    def _tag(self, image_id: str, manifest: Manifest, commit: str) -> str:
        repository = f"{self.config.repository_prefix}/{manifest.service.name}"
        client = self._client()
        try:
            client.images.get(image_id).tag(repository, commit[:12])
        finally:
            client.close()
        return f"{repository}:{commit[:12]}"

    async def _call(self, fn: Any, /, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except docker.errors.DockerException as exc:
            raise BuildFailed(f"Docker Engine error: {_cut(str(exc))}") from exc
        except requests.RequestException as exc:
            raise BuildFailed(f"cannot reach Docker Engine: {_cut(str(exc))}") from exc

    # --- helpers ----------------------------------------------------------------------------

    def _inputs_key(self, tree: str, dockerfile: str | None) -> str:
        # Not the registry: where an image is pushed does not change what is built, so turning
        # --registry on reuses (and pushes) the images already built.
        config = self.config.model_dump(mode="json", exclude={"api_timeout_seconds", "registry"})
        blob = json.dumps(
            {"format": _CACHE_FORMAT, "tree": tree, "dockerfile": dockerfile, "config": config},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _artifact(
        self,
        image_id: str,
        tag: str,
        resolved: ResolvedSource,
        manifest: Manifest,
        durations: dict[str, int],
        log: BuildLog,
        *,
        hit: bool,
        outcome: _Outcome | None = None,
        no_cache: bool = False,
    ) -> Artifact:
        return Artifact(
            digest=image_id,
            kind="oci-image",
            location=tag,
            commit=resolved.commit,
            manifest=manifest,
            builder=self.kind,
            duration_ms=durations["total"],
            cache=CacheReport(
                artifact_hit=hit,
                layers_cached=None if outcome is None else outcome.cached_steps,
                layers_built=None if outcome is None else outcome.steps - outcome.cached_steps,
                durations_ms=durations,
                no_cache=no_cache,
            ),
            log_path=log.path,
            tree=resolved.tree,
        )


def dockerfile_in(context: Path, relative: str) -> str:
    """``relative`` resolved inside ``context`` (symlinks followed); the path to hand to the
    engine. ``SourceError`` when it is missing, not a file, or resolves outside the context."""
    parts = relative.replace("\\", "/").split("/")
    if relative.startswith("/") or ".." in parts:
        raise SourceError(f"dockerfile {relative!r} must be a relative path inside the repository")
    root = os.path.realpath(context)
    real = os.path.realpath(context / relative)
    if real != root and not real.startswith(root + os.sep):
        raise SourceError(f"dockerfile {relative!r} points outside the repository")
    if not os.path.isfile(real):
        raise SourceError(f"dockerfile {relative!r} not found in the commit")
    return os.path.relpath(real, root)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REGISTRY = re.compile(
    rf"(?P<host>{_HOST})(?::(?P<port>[0-9]{{1,5}}))?(?P<path>(?:/{_PATH_COMPONENT})*)"
)


def check_registry(value: str) -> str:
    """``value`` if it names a registry the way image references start (``host[:port][/path]``,
    e.g. ``127.0.0.1:5000`` or ``registry.example.com/team``); ``InvalidInput`` saying why not.
    Called by ``DockerBuilderConfig`` and ``shipyard serve --registry``."""
    if "://" in value:
        raise InvalidInput(
            f"registry {value!r}: no scheme, write host[:port][/path] (e.g. 127.0.0.1:5000); "
            "whether plain HTTP is allowed is Docker Engine's setting (insecure-registries)"
        )
    match = _REGISTRY.fullmatch(value)
    if match is None:
        raise InvalidInput(
            f"registry {value!r} is not host[:port][/path] (path: lower-case letters, digits "
            "and . _ - separators), e.g. 127.0.0.1:5000 or registry.example.com/team"
        )
    port, host = match["port"], match["host"]
    if port is not None and not 0 < int(port) < 65536:
        raise InvalidInput(f"registry {value!r}: port {port} is not in 1-65535")
    if port is None and "." not in host and host != "localhost" and not host.startswith("["):
        # Docker reads a first component without '.', ':' or "localhost" as a Docker Hub
        # namespace: the image would go to docker.io, not to this host.
        raise InvalidInput(
            f"registry {value!r}: Docker would read {host!r} as a Docker Hub namespace; give a "
            f"port ({host}:5000) or a fully qualified name"
        )
    return value


class _PushError(Exception):
    """The engine's push stream reported an error (inside the builder only: becomes
    ``BuildFailed``)."""


def _absorb_push(chunk: Any, emit: Any) -> str | None:
    """One decoded JSON message of the engine's push stream: logged (per-layer states, not the
    progress bars); the manifest digest when it is the final ``aux`` message."""
    if not isinstance(chunk, dict):
        return None
    if "error" in chunk:
        detail = chunk.get("errorDetail") or {}
        raise _PushError(str(detail.get("message") or chunk["error"]))
    if "status" in chunk and not chunk.get("progress"):
        emit((f"{chunk['id']}: " if chunk.get("id") else "") + str(chunk["status"]))
    aux = chunk.get("aux")
    if isinstance(aux, dict) and str(aux.get("Digest", "")).startswith("sha256:"):
        return str(aux["Digest"])
    return None


def _absorb(chunk: Any, outcome: _Outcome, emit: Any) -> None:
    """One decoded JSON message of the engine's build stream."""
    if not isinstance(chunk, dict):
        return
    if "stream" in chunk:
        for line in str(chunk["stream"]).splitlines():
            stripped = line.rstrip()
            if stripped.startswith("Step "):
                outcome.steps += 1
            elif stripped.strip() == "---> Using cache":
                outcome.cached_steps += 1
            if stripped:
                emit(stripped)
    if "status" in chunk:
        emit(str(chunk["status"]) + (f" {chunk['progress']}" if chunk.get("progress") else ""))
    if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
        outcome.image_id = str(chunk["aux"]["ID"])
    if "error" in chunk:
        detail = chunk.get("errorDetail") or {}
        outcome.error = str(detail.get("message") or chunk["error"])
        emit(f"error: {outcome.error}")


def _created(image: Any) -> tuple[str, str]:
    """Sort key of an image's ``Created`` (RFC 3339 in UTC, fraction trimmed of zeros by Go)."""
    head, _, fraction = str(image.attrs.get("Created", "")).removesuffix("Z").partition(".")
    return head, fraction.ljust(9, "0")


def _response_of(stream: Any) -> requests.Response | None:
    # docker-py's build() returns a generator over the streaming response and keeps no other
    # handle on it; the generator's frame holds it (None once the generator finished).
    frame = getattr(stream, "gi_frame", None)
    response = frame.f_locals.get("response") if frame is not None else None
    return response if isinstance(response, requests.Response) else None


def _disconnect(stream: Any) -> None:
    """Shut down the socket under a build stream so the engine cancels the build and the
    worker's blocking read returns (if the response cannot be found, the worker is abandoned)."""
    response = _response_of(stream)
    if response is None:
        return
    with contextlib.suppress(Exception):
        raw = response.raw._fp.fp.raw
        sock = getattr(raw, "_sock", raw)
        sock.shutdown(socket.SHUT_RDWR)


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)


def _cut(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."
