"""The build service's contract: ``Builder`` turns a source (repository, branch, commit) into an
immutable, content-addressed ``Artifact``. The orchestrator's build stage calls it; backends live
beside this module (``local.py``, ``docker.py``, ``cloudbuild.py``) and are picked by
``[build] builder`` in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from shipyard.domain.manifest import Manifest
from shipyard.domain.models import BUILD_TIME_TARGET_MS, SourceConfig

LogSink = Callable[[str], None]

#: A build's log is cut past this many bytes (``shipyard serve --max-build-log-mb``): a build
#: printing without end must not fill the disk or the API's log stream.
DEFAULT_MAX_LOG_BYTES = 10 * 2**20


@dataclass(frozen=True)
class BuildRequest:
    source: SourceConfig
    #: Where build logs stream line by line (the CLI shows them live); None = only kept on disk.
    log_sink: LogSink | None = None
    #: Build afresh: reuse no earlier result (``shipyard build --no-cache``, ``shipyard deploy
    #: --rebuild``). The local builder skips its input index and dependency cache (and replaces
    #: the cached entries with this build's), Docker builds with ``nocache``, Cloud Build
    #: restores no cache. The result is still cached for later builds.
    no_cache: bool = False
    #: Bytes of log kept for this build; past it one notice line, then output is dropped (the
    #: build goes on). Builders pass it to ``running.BuildLog``.
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES


@dataclass(frozen=True)
class CacheReport:
    artifact_hit: bool = False
    dependencies_hit: bool | None = None  # None: the build has no dependency step
    cache_bytes: int = 0
    evicted_entries: int = 0
    #: Bytes of this build's dependency-cache entry and of its artifact (0: unknown / none).
    dependencies_bytes: int = 0
    artifact_bytes: int = 0
    #: The input-index key (commit tree + build configuration) and the dependency-cache key.
    inputs_key: str | None = None
    dependencies_key: str | None = None
    #: Docker builds: build steps answered from / not from the engine's layer cache.
    layers_cached: int | None = None
    layers_built: int | None = None
    #: Wall time per phase: "fetch", "verify" (a cached artifact re-checked), "checkout",
    #: "dependencies", "command", "digest", "publish", "total".
    durations_ms: dict[str, int] = field(default_factory=dict)
    #: The request asked for no cache (``BuildRequest.no_cache``): nothing was looked up.
    no_cache: bool = False
    #: Why the artifact cached for these inputs was not reused although the index had it (it
    #: failed ``verify_artifact``: modified, missing or unreadable); it was dropped and rebuilt.
    artifact_rejected: str | None = None


@dataclass(frozen=True)
class Artifact:
    #: ``sha256:<hex>`` over the artifact's content (directory tree or OCI image).
    digest: str
    kind: Literal["directory", "oci-image"]
    #: Directory holding the runnable tree (kind=directory) or the image reference (oci-image).
    location: str
    commit: str  # full commit id that was built
    manifest: Manifest
    builder: str
    duration_ms: int
    cache: CacheReport = field(default_factory=CacheReport)
    log_path: Path | None = None
    #: The commit's tree id (identical trees with the same build configuration share artifacts).
    tree: str | None = None

    @property
    def build_time_ok(self) -> bool:
        """ADR section 8: did this build finish within the 4-minute target?"""
        return self.duration_ms <= BUILD_TIME_TARGET_MS


class Builder(Protocol):
    kind: str

    async def build(self, request: BuildRequest) -> Artifact:
        """Fetch, check out, build. Raises SourceError / ManifestError / BuildFailed."""
        ...
