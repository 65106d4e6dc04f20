"""Which builder builds a source: a registry keyed by ``[build] builder`` (Prefect-worker style).

Each kind is registered once with its own pydantic config model and a factory; choosing one is a
dictionary lookup, never an if-chain. The server's settings carry one raw settings mapping per
kind (``BuildConfig.builders``), validated by that kind's model when the kind is used. Called by
the orchestrator's build stage and ``shipyard build`` (``cli/build.py``)::

    config = BuildConfig(data_dir=Path(".shipyard"))
    artifact = await build_source(BuildRequest(source), config)

or, when the manifest is already at hand, ``builder_for(manifest, source, config).build(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shipyard.build.base import Artifact, Builder, BuildRequest
from shipyard.build.cloudbuild import CloudBuildBuilder, CloudBuildBuilderConfig
from shipyard.build.docker import DockerBuilder, DockerBuilderConfig
from shipyard.build.local import LocalBuilder, LocalBuilderConfig
from shipyard.build.source import read_manifest_at, resolve_source
from shipyard.domain.manifest import Manifest
from shipyard.domain.models import SourceConfig
from shipyard.errors import BuildFailed, ManifestError
from shipyard.sandbox import Sandbox, SandboxPolicy


class BuildConfig(BaseModel):
    """Server-side build settings: where builds live and each builder kind's own settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    data_dir: Path
    #: Where build logs (logs/) and artifacts (artifacts/) go, seen by every replica
    #: (``serve --shared-dir``); None: ``data_dir``.
    shared_dir: Path | None = None
    #: How build commands are confined; None: the default sandbox for ``data_dir``.
    sandbox: SandboxPolicy | None = None
    #: kind -> settings for that kind's config model, e.g.
    #: ``{"cloudbuild": {"project_id": "p", "registry": "gcr.io/p", "cache_bucket": "b"}}``.
    builders: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class BuilderKind:
    config_model: type[BaseModel]
    factory: Callable[..., Builder]
    #: Whether the factory takes ``sandbox=`` (builders that run the repository's commands on
    #: this machine must; those that hand the build to an engine or a cloud do not).
    sandboxed: bool = False


_REGISTRY: dict[str, BuilderKind] = {}


def register(
    kind: str,
    config_model: type[BaseModel],
    factory: Callable[..., Builder],
    *,
    sandboxed: bool = False,
) -> None:
    """Add (or replace, e.g. with a fake in tests) the builder for ``[build] builder = kind``;
    the factory is called ``factory(data_dir, settings, shared_dir=Path | None)``, plus
    ``sandbox=Sandbox`` when ``sandboxed``."""
    _REGISTRY[kind] = BuilderKind(config_model=config_model, factory=factory, sandboxed=sandboxed)


def kinds() -> Mapping[str, BuilderKind]:
    return dict(_REGISTRY)


register("local", LocalBuilderConfig, LocalBuilder, sandboxed=True)
register("docker", DockerBuilderConfig, DockerBuilder)
register("cloudbuild", CloudBuildBuilderConfig, CloudBuildBuilder)


def builder_for(manifest: Manifest, source: SourceConfig, config: BuildConfig) -> Builder:
    """The builder ``manifest`` asks for, configured from the server's settings for that kind.

    ``source`` is part of the contract for backends whose choice depends on it; the registered
    kinds only need the manifest. ``ManifestError`` for a kind nobody registered;
    ``BuildFailed`` when the server has no valid settings for the kind (e.g. cloudbuild without
    a project).
    """
    del source  # not needed by the registered kinds (see docstring)
    kind = manifest.build.builder
    entry = _REGISTRY.get(kind)
    if entry is None:
        raise ManifestError(
            f"[build] builder = {kind!r} is not available; "
            f"use one of {', '.join(sorted(_REGISTRY))}"
        )
    try:
        settings = entry.config_model.model_validate(
            {"kind": kind, **config.builders.get(kind, {})}
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise BuildFailed(
            f"the {kind!r} builder is not configured on this server ({problems}); "
            f"set builders.{kind} in the server settings"
        ) from exc
    shared = config.shared_dir
    if entry.sandboxed:
        hide = (shared,) if shared is not None else ()
        policy = config.sandbox or SandboxPolicy(data_dir=config.data_dir, hide=hide)
        return entry.factory(config.data_dir, settings, shared_dir=shared, sandbox=Sandbox(policy))
    return entry.factory(config.data_dir, settings, shared_dir=shared)


async def manifest_for(source: SourceConfig, config: BuildConfig) -> Manifest:
    """The commit's manifest, read from the mirror without a checkout (to choose the builder)."""
    resolved = await resolve_source(source, cache_dir=config.data_dir)
    return await read_manifest_at(resolved)


async def build_source(request: BuildRequest, config: BuildConfig) -> Artifact:
    """Read the manifest, pick the builder it names, build."""
    manifest = await manifest_for(request.source, config)
    return await builder_for(manifest, request.source, config).build(request)


class RegistryBuilder:
    """The ``Builder`` the server uses: each build reads the commit's manifest and goes to the
    backend it names (``[build] builder``: local, docker, cloudbuild)."""

    kind = "registry"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config

    async def build(self, request: BuildRequest) -> Artifact:
        return await build_source(request, self.config)
