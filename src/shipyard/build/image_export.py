"""An image's filesystem, streamed out of Docker Engine for the security gate.

``ImageExporter.export(image, consume)`` creates a container from the image without starting
it (no network, a command that never runs), hands ``consume`` a file object over the engine's
``GET /containers/{id}/export`` tar stream (the layers already applied, whiteouts honoured: what
the container would see), and removes the container whatever happens. Nothing of the image is
executed, and nothing is pulled: the image must be on the engine, addressed by the image ID the
builder returned (the digest the gate signs), so the bytes scanned are the bytes signed.

The engine is the Docker builder's (``DockerBuilderConfig.base_url``, from the server's
``BuildConfig.builders["docker"]``): the engine that built the image is the one that has it.
Blocking (the SDK is); the orchestrator's scan stage runs it in a worker thread. Every docker /
requests error becomes ``SecurityScanFailed`` with a reason (``engine_unreachable``,
``image_missing``, ``image_export_failed``): without the image's files the gate vouches for
nothing, so the deployment fails closed. What ``consume`` raises passes through unchanged.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

import docker
import docker.errors
import requests
import urllib3.exceptions
from pydantic import ValidationError

from shipyard.build.docker import DockerBuilderConfig
from shipyard.build.registry import BuildConfig
from shipyard.errors import SecurityScanFailed
from shipyard.logs import log_event

T = TypeVar("T")
log = logging.getLogger("shipyard.build")

#: Set on the short-lived containers made only to export an image (never started).
SCAN_LABEL = "dev.shipyard.scan-export"
_NEVER_RUNS = ["/shipyard-export-only-never-started"]
_MAX_ERROR_CHARS = 500


class _ChunkReader(io.RawIOBase):
    """A readable raw stream over the SDK's chunk iterator (for ``tarfile``'s stream mode)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class ImageExporter:
    """Streams image filesystems out of the Docker builder's engine."""

    def __init__(self, config: DockerBuilderConfig | None = None) -> None:
        self.config = config or DockerBuilderConfig()

    @classmethod
    def from_build_config(cls, config: BuildConfig) -> ImageExporter:
        """The exporter for the engine the server's Docker builder uses.

        ``SecurityScanFailed`` when those settings are invalid (the builder refuses them too)."""
        try:
            settings = DockerBuilderConfig.model_validate(
                {"kind": "docker", **config.builders.get("docker", {})}
            )
        except ValidationError as exc:
            raise SecurityScanFailed(
                f"cannot export images to scan them: the docker builder's settings are "
                f"invalid ({_cut(str(exc))}); set builders.docker in the server settings",
                vulnerabilities=0,
                reason="engine_unreachable",
            ) from exc
        return cls(settings)

    @property
    def address(self) -> str:
        return self.config.base_url or os.environ.get("DOCKER_HOST", "") or "the default engine"

    def export(self, image: str, consume: Callable[[IO[bytes]], T]) -> T:
        """``consume(stream)`` over ``image``'s filesystem as a tar stream; its result."""
        client = self._client(image)
        try:
            container = self._create(client, image)
            try:
                chunks = container.export(chunk_size=1 << 20)
                with io.BufferedReader(_ChunkReader(chunks), buffer_size=1 << 20) as stream:
                    return consume(stream)
            except (
                docker.errors.DockerException,
                requests.RequestException,
                urllib3.exceptions.HTTPError,  # the SDK streams from urllib3 directly
            ) as exc:
                raise _failed(
                    f"cannot export image {image} from Docker Engine at {self.address}: "
                    f"{_cut(str(exc))}",
                    "image_export_failed",
                ) from exc
            finally:
                self._remove(container)
        finally:
            client.close()

    # --- engine calls -------------------------------------------------------------------------

    def _client(self, image: str) -> docker.DockerClient:
        url = self.config.base_url or os.environ.get("DOCKER_HOST", "")
        if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
            # Checked first: docker-py leaks the socket of a failed unix connect.
            raise _failed(
                f"cannot scan image {image}: Docker Engine is unreachable (no socket at {url}); "
                "start it, or point builders.docker.base_url at the engine that built the image",
                "engine_unreachable",
            )
        timeout = int(self.config.api_timeout_seconds)
        try:
            if self.config.base_url is None:
                return docker.from_env(timeout=timeout)
            return docker.DockerClient(base_url=self.config.base_url, timeout=timeout)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise _failed(
                f"cannot scan image {image}: Docker Engine at {self.address} is unreachable: "
                f"{_cut(str(exc))}",
                "engine_unreachable",
            ) from exc

    def _create(self, client: docker.DockerClient, image: str) -> Any:
        try:
            return client.containers.create(
                image,
                command=_NEVER_RUNS,
                network_mode="none",
                labels={SCAN_LABEL: "1"},
            )
        except docker.errors.ImageNotFound as exc:
            raise _failed(
                f"cannot scan image {image}: Docker Engine at {self.address} does not have it "
                "(it was removed, or built on another engine); build it again",
                "image_missing",
            ) from exc
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise _failed(
                f"cannot scan image {image}: Docker Engine at {self.address} refused to create "
                f"a container to export it: {_cut(str(exc))}",
                "engine_unreachable"
                if isinstance(exc, requests.ConnectionError)
                else "image_export_failed",
            ) from exc

    def _remove(self, container: Any) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # already gone: what we wanted
        except (docker.errors.DockerException, requests.RequestException) as exc:
            # The scan's outcome stands (the container never ran); the leftover is named in
            # the log, and carries SCAN_LABEL so it can be found and removed.
            log_event(
                log,
                "image_export.cleanup_failed",
                level=logging.WARNING,
                container=container.id,
                error=_cut(str(exc)),
            )


def _failed(message: str, reason: str) -> SecurityScanFailed:
    return SecurityScanFailed(message, vulnerabilities=0, reason=reason)


def _cut(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."
