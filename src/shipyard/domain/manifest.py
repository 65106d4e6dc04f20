"""``shipyard.toml``: how a repository builds, runs and proves itself healthy.

Read from the checked-out commit by the build stage; the CLI reads it for the default service name.
Errors name the field and the reason (``ManifestError``)::

    [service]
    name = "hello"                  # DNS label; the request's target.service_name wins
    hosts = ["hello.example.com"]   # optional: names on the agent's shared listeners
    port = 8080                     # optional: the service's own port (default: the agent picks)
    https_redirect = true           # optional: 308 from http:// to https:// on the shared listener
    hsts_max_age = 31536000         # optional: Strict-Transport-Security on https responses

    [build]
    command = "pip install -r requirements.txt -t deps"   # optional, run in the checked-out tree
    cache_key_files = ["requirements.txt"]                 # optional, dependency cache key

    [run]
    command = "python app.py"       # started with PORT set; must listen on 127.0.0.1:$PORT
    replicas = 1

    [health]                        # ADR HealthCheck; fractional seconds allowed
    endpoint = "/health"
    interval_seconds = 0.5
    timeout_seconds = 1
    success_threshold = 2
    failure_threshold = 3

    [analysis]                      # optional: canary analysis defaults (a stage's settings win)
    min_success_rate = 0.99         # non-5xx / all, per measurement window
    max_p99_latency_ms = 500
    min_requests = 20               # fewer: the verdict is insufficient_data ...
    insufficient_data = "extend"    # ... and this decides: extend | pause | fail
    interval_seconds = 10
    failure_limit = 0               # fails when failed measurements exceed this (Argo)

    [routing]                       # optional: the key canary stages with sticky = true use
    sticky_header = "x-user-id"     # and/or sticky_cookie = "session"
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator

from shipyard.domain.hostnames import parse_host_rule
from shipyard.domain.models import AnalysisSettings, DnsLabel, HealthCheck, WireModel
from shipyard.errors import ManifestError

MANIFEST_NAME = "shipyard.toml"
MAX_MANIFEST_BYTES = 64 * 1024


class ServiceSection(WireModel):
    name: DnsLabel
    hosts: Annotated[
        list[str],
        Field(
            max_length=64,
            description=(
                "Host names this service answers on the agent's shared listeners "
                "(`shipyard agent --http-listen/--https-listen`), routed by the request's Host: "
                '"notes.example.com", a wildcard one label deep "*.example.com", or with a path '
                'prefix "example.com/api" (longest prefix wins). Another service on the same '
                "agent claiming the same host and path is refused. Empty: reachable only on "
                "the service's own port."
            ),
        ),
    ] = Field(default_factory=list)
    port: Annotated[
        int | None,
        Field(
            strict=True,
            ge=1,
            le=65535,
            description=(
                "The service's own listener port on the agent (loopback), instead of one the "
                "agent picks; a port another service or process holds is refused, naming it."
            ),
        ),
    ] = None
    https_redirect: Annotated[
        bool,
        Field(
            strict=True,
            description=(
                "On the shared HTTP listener, answer this service's hosts with a 308 redirect "
                "to the same URL on https instead of serving them."
            ),
        ),
    ] = False
    hsts_max_age: Annotated[
        int,
        Field(
            strict=True,
            ge=0,
            le=63_072_000,
            description=(
                "Seconds for the Strict-Transport-Security header the router adds to this "
                "service's responses on the shared HTTPS listener (31536000 = a year); 0 adds "
                "none."
            ),
        ),
    ] = 0

    @field_validator("hosts")
    @classmethod
    def _host_rules(cls, v: list[str]) -> list[str]:
        """Each entry must be a host rule (``domain.hostnames``); kept normalised, no repeats."""
        return list(dict.fromkeys(str(parse_host_rule(h)) for h in v))


class BuildSection(WireModel):
    command: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    builder: Annotated[str, Field(pattern=r"^(local|docker|cloudbuild)$")] = "local"
    cache_key_files: list[str] | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 600.0
    #: cargo-chef style dependency step: run in a tree holding only the cache-key files; its
    #: output is cached by (key files' content, this command) and copied into the checkout
    #: before ``command`` runs, e.g. "pip install -r requirements.txt --target .deps".
    dependencies: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    #: Dockerfile for the docker / cloudbuild builders, relative to the repository root
    #: (the request's ``source.dockerfile`` wins).
    dockerfile: Annotated[str, Field(min_length=1, max_length=1024)] | None = None

    @field_validator("command", "dependencies")
    @classmethod
    def _splits(cls, v: str | None) -> str | None:
        if v is not None:
            _split(v)
        return v

    @field_validator("cache_key_files")
    @classmethod
    def _relative_patterns(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) > 64:
            raise ValueError("at most 64 cache_key_files")
        for pattern in v:
            parts = pattern.replace("\\", "/").split("/")
            if not pattern or pattern.startswith("/") or ".." in parts or len(pattern) > 1024:
                raise ValueError(
                    f"cache_key_files entry {pattern!r} must be a relative path or glob inside "
                    "the repository (no '..', no leading '/')"
                )
        return v

    @field_validator("dockerfile")
    @classmethod
    def _dockerfile_inside(cls, v: str | None) -> str | None:
        if v is not None:
            parts = v.replace("\\", "/").split("/")
            if v.startswith("/") or ".." in parts:
                raise ValueError(
                    f"dockerfile {v!r} must be a relative path inside the repository "
                    "(no '..', no leading '/')"
                )
        return v

    @property
    def argv(self) -> list[str] | None:
        """The build command as an argv list (never handed to a shell); None: nothing to run."""
        return None if self.command is None else _split(self.command)

    @property
    def dependencies_argv(self) -> list[str] | None:
        return None if self.dependencies is None else _split(self.dependencies)


class RunSection(WireModel):
    command: Annotated[str, Field(min_length=1, max_length=4096)]
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _splits(cls, v: str) -> str:
        _split(v)
        return v

    @property
    def argv(self) -> list[str]:
        """The run command as an argv list: never handed to a shell."""
        return _split(self.command)


class RoutingSection(WireModel):
    """How the router recognises a user for sticky canary stages (header preferred)."""

    sticky_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")] | None = (
        None
    )
    sticky_cookie: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")] | None = (
        None
    )


class Manifest(WireModel):
    service: ServiceSection
    build: BuildSection = Field(default_factory=BuildSection)
    run: RunSection
    health: HealthCheck = Field(default_factory=HealthCheck)
    #: Canary analysis defaults for this service; a stage's ``analysis`` overrides them.
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    #: Security policy (block thresholds, expiring allow-list); validated by security/policy.py.
    security: dict[str, Any] | None = None


def _split(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot split command into arguments: {exc}") from exc
    if not argv:
        raise ValueError("command is empty")
    return argv


def parse_manifest(text: str, *, origin: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest text; ``ManifestError`` names the field and the reason."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{origin}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ManifestError(f"{origin}: " + "; ".join(problems), problems=problems) from exc


def load_manifest(repo_dir: Path) -> Manifest:
    """Read ``shipyard.toml`` from a checked-out tree."""
    path = repo_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{MANIFEST_NAME} not found at the repository root; add one with [service] name and "
            "[run] command (see README)"
        )
    return parse_manifest(path.read_text(encoding="utf-8", errors="replace"))
