"""``shipyard.toml``: how a repository builds, runs and proves itself healthy.

Read from the checked-out commit by the build stage; the CLI reads it for the default service name.
Errors name the field and the reason (``ManifestError``). Every field's ``description`` is its
entry in README.md's manifest reference (``shipyard.cli.manifest_docs`` writes it; a field without
one fails ``tests/cli/test_manifest_docs.py``). Commands are argv lists, strings split by
``shlex`` (refused, with how to write it, when they hold shell syntax), or with ``shell = true``
strings run by ``/bin/sh -c`` (``to_argv``)::

    [service]
    name = "hello"                  # DNS label; the request's target.service_name wins
    hosts = ["hello.example.com"]   # optional: names on the agent's shared listeners
    port = 8080                     # optional: the service's own port (default: the agent picks)
    https_redirect = true           # optional: 308 from http:// to https:// on the shared listener
    hsts_max_age = 31536000         # optional: Strict-Transport-Security on https responses

    [build]
    shell = true                    # optional: the commands below run as /bin/sh -c '...'
    dependencies = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    cache_key_files = ["requirements.txt"]                 # optional, dependency cache key

    [run]
    command = ["gunicorn", "app:app"]   # started with PORT set; must listen on 127.0.0.1:$PORT
    replicas = 1
    env = { GREETING = "hi" }
    # images only: port = 8080, memory = "256m", cpus = 0.5; both: stop_timeout_seconds = 10

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
    revision_header = true          # x-shipyard-revision on responses (default: off)

``[hooks]``, ``[[gates]]`` and ``[deploy]`` are ``domain/release.py``'s; ``[run] secrets`` names
the service's secrets its replicas get (``shipyard secret set``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shipyard.domain.commands import Command, command_text, to_argv
from shipyard.domain.hostnames import parse_host_rule
from shipyard.domain.models import AnalysisSettings, DnsLabel, HealthCheck, WireModel
from shipyard.domain.release import DeploySection, GateSpec, HooksSection, check_gates
from shipyard.errors import ManifestError

MANIFEST_NAME = "shipyard.toml"
#: ``[build] builder`` values whose artifact is an OCI image.
IMAGE_BUILDERS = frozenset({"docker", "cloudbuild"})
MAX_MANIFEST_BYTES = 64 * 1024


_SHELL_DESCRIPTION = (
    "true: `command`{also} run by `/bin/sh -c` as written, so `&&`, `|`, `>`, `$VAR` and "
    "`$(...)` work (the workload is sandboxed either way); the command must then be a string. "
    "false: a string is split into arguments and run without a shell; one that uses shell "
    "syntax is refused with the way to write it."
)


class ServiceSection(WireModel):
    """What the service is called."""

    name: DnsLabel = Field(
        description="The service's name: a DNS label (lowercase letters, digits, '-'; at most 63). "
        "The default for `shipyard deploy --service`; the request's `target.service_name` wins."
    )
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
    """How the commit becomes an artifact (optional: without it, the checked-out tree is it)."""

    shell: bool = Field(
        default=False, description=_SHELL_DESCRIPTION.format(also=" and `dependencies` are")
    )
    command: Command | None = Field(
        default=None,
        description="Run in the checked-out tree after the dependency step; what it leaves there "
        'is the artifact. A string (`"make dist"`) or an argv list '
        '(`["sh", "-c", "pip install -r requirements.txt && make"]`). A virtualenv made '
        "here works after the artifact moves: its scripts are made relocatable when sealed.",
    )
    builder: Literal["local", "docker", "cloudbuild"] = Field(
        default="local",
        description="Who builds: `local` (this machine, sandboxed), `docker` (Docker Engine, an "
        "image) or `cloudbuild` (Google Cloud Build); the server must have that builder set up.",
    )
    cache_key_files: list[str] | None = Field(
        default=None,
        description="Relative paths or globs whose content keys the dependency cache (at most "
        "64). Default: the lock and requirements files present at the root "
        "(requirements*.txt, poetry.lock, uv.lock, Pipfile.lock, package-lock.json, yarn.lock, "
        "pnpm-lock.yaml, Cargo.lock, go.sum).",
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=600.0,
        description="One budget for `dependencies` and `command` together; past it the whole "
        "process group is killed and the build fails.",
    )
    #: cargo-chef style dependency step: run in a tree holding only the cache-key files; its
    #: output is cached by (key files' content, this command) and copied into the checkout
    #: before ``command`` runs, e.g. "pip install -r requirements.txt --target .deps".
    dependencies: Command | None = Field(
        default=None,
        description="Dependency step, run in a tree holding only the `cache_key_files`; its "
        "output is cached by their content and this command, and copied into the checkout "
        "before `command` runs, so a source-only change reuses it. E.g. "
        '`"python3 -m pip install -r requirements.txt --target .deps"`. String or list, as '
        "`command`.",
    )
    #: Dockerfile for the docker / cloudbuild builders, relative to the repository root
    #: (the request's ``source.dockerfile`` wins).
    dockerfile: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        default=None,
        description="Dockerfile for the `docker` and `cloudbuild` builders, relative to the "
        "repository root (default `Dockerfile`; the request's `source.dockerfile` wins).",
    )

    @field_validator("command", "dependencies")
    @classmethod
    def _runnable(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if v is not None:
            to_argv(v, shell=bool(info.data.get("shell")), key=f"build.{info.field_name}")
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
        """The build command as an argv list (a shell only when asked); None: nothing to run."""
        return None if self.command is None else to_argv(self.command, shell=self.shell)

    @property
    def dependencies_argv(self) -> list[str] | None:
        if self.dependencies is None:
            return None
        return to_argv(self.dependencies, shell=self.shell)

    @property
    def command_text(self) -> str | None:
        """The build command as one line, for provenance and logs."""
        return None if self.command is None else command_text(self.command)


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


#: ``[run] memory``: a number and a unit as Docker writes it (``b``, ``k``, ``m``, ``g``; no
#: unit: bytes), e.g. ``"256m"``, ``"1.5g"``.
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmg]?)$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
#: Docker Engine's smallest memory limit.
MIN_MEMORY_BYTES = 6 * 2**20
MAX_MEMORY_BYTES = 2**50


def parse_memory(text: str) -> int:
    """``[run] memory`` in bytes; ValueError saying what is accepted."""
    found = _MEMORY.match(text.strip())
    if found is None:
        raise ValueError(
            f"memory {text!r} is not a size: write a number and a unit b, k, m or g, "
            'e.g. "256m" or "1g"'
        )
    size = int(float(found.group(1)) * _MEMORY_UNITS[found.group(2).lower()])
    if not MIN_MEMORY_BYTES <= size <= MAX_MEMORY_BYTES:
        raise ValueError(
            f"memory {text!r} is {size} bytes; a container needs at least 6m (Docker's "
            "minimum) and at most 1024t"
        )
    return size


class RunSection(WireModel):
    """How a replica starts: the command, how many, its environment; for images also the port
    inside the container and resource limits."""

    shell: bool = Field(default=False, description=_SHELL_DESCRIPTION.format(also=" is"))
    command: Command | None = Field(
        default=None,
        description="Starts one replica, in the artifact's directory, with `PORT` set: it must "
        'listen on 127.0.0.1:$PORT. A string (`"python3 app.py"`) or an argv list; with '
        '`shell = true` write `exec` before the server (`"exec gunicorn -b 127.0.0.1:$PORT '
        "app:app\"`) so it gets the stop signal. A virtualenv's `bin` in the artifact (any "
        "top-level directory holding `pyvenv.cfg`, e.g. `.venv`) is first on `PATH`. Required "
        'for directory artifacts; optional for images (`[build] builder = "docker"`), whose '
        "ENTRYPOINT and CMD run unless this replaces both.",
    )
    replicas: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="Replicas of each revision (the rolling strategy's target count)."
    )
    env: dict[Annotated[str, StringConstraints(pattern=_ENV_NAME, max_length=256)], str] = Field(
        default_factory=dict,
        description='Extra environment variables, e.g. `{ PYTHONPATH = ".deps" }`. A replica '
        "sees only these and its own: `PATH` (/usr/local/bin:/usr/bin:/bin, after the artifact's "
        "virtualenv), `HOME` and `TMPDIR` (its own, emptied at each start), `LANG`, `PORT`, "
        "`SHIPYARD_SERVICE`/`_REVISION`/`_REPLICA`/`_REGION`; never the server's. `PORT` and "
        "`SHIPYARD_*` cannot be overridden. A container also keeps its image's `ENV`.",
    )
    port: Annotated[
        int | None,
        Field(
            strict=True,
            ge=1,
            le=65535,
            description="Images only: the port the app listens on inside its container (`PORT` "
            "is set to it) when the agent publishes container ports; on host networking each "
            "replica gets a port of its own in `PORT` instead. Default: the image's `EXPOSE`, "
            "else 8080.",
        ),
    ] = None
    memory: Annotated[str, Field(max_length=32)] | None = Field(
        default=None,
        description='Images only: memory limit of each container, e.g. "256m" or "1g" '
        "(units b, k, m, g; at least 6m). Past it the kernel kills the app, which counts as a "
        "crash. Default: no limit.",
    )
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = Field(
        default=None,
        description="Images only: CPUs each container may use, e.g. 0.5 (at least 0.01). "
        "Default: no limit.",
    )
    stop_timeout_seconds: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=10.0,
        description="Seconds a replica has to exit after the stop signal (SIGTERM, or the "
        "image's STOPSIGNAL) once the router has drained its requests; then it is killed.",
    )

    secrets: list[Annotated[str, StringConstraints(pattern=_ENV_NAME, max_length=256)]] = Field(
        default_factory=list,
        max_length=64,
        description="The service's secrets (`shipyard secret set SERVICE NAME`) each replica and "
        'hook gets as an environment variable of that name, e.g. `["DB_PASSWORD"]`. A deployment '
        "records which version of each it used (a rollback restores those); one not set fails "
        "the deployment before anything starts. Never in logs, API answers, the audit trail or "
        "SBOMs.",
    )
    secret_files: dict[
        Annotated[str, StringConstraints(pattern=_ENV_NAME, max_length=256)],
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")],
    ] = Field(
        default_factory=dict,
        description="Secrets given as files instead, secret name -> file name, e.g. "
        '`{ TLS_KEY = "tls.key" }`: each replica and hook reads it at '
        "`$SHIPYARD_SECRETS_DIR/tls.key` (a private directory, mode 0400 files).",
    )

    @field_validator("command")
    @classmethod
    def _runnable(cls, v: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if v is not None:
            to_argv(v, shell=bool(info.data.get("shell")), key="run.command")
        return v

    @model_validator(mode="after")
    def _secrets_once(self) -> RunSection:
        both = sorted(set(self.secrets) & set(self.secret_files))
        if both:
            raise ValueError(
                f"secret(s) {', '.join(both)} named in both [run] secrets and [run] "
                "secret_files: give each one way (an environment variable or a file)"
            )
        if len(set(self.secret_files.values())) < len(self.secret_files):
            raise ValueError("[run] secret_files: two secrets would be written to one file")
        return self

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_memory(v)
        return v

    @field_validator("cpus")
    @classmethod
    def _cpu_share(cls, v: float | None) -> float | None:
        if v is not None and v < 0.01:
            raise ValueError(f"cpus {v} is below 0.01, the smallest share a container can get")
        return v

    @property
    def argv(self) -> list[str]:
        """The run command as an argv list (through ``/bin/sh -c`` only with ``shell = true``);
        empty without a command (an image's ENTRYPOINT/CMD runs)."""
        return [] if self.command is None else to_argv(self.command, shell=self.shell)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_memory(self.memory)

    @property
    def nano_cpus(self) -> int | None:
        return None if self.cpus is None else round(self.cpus * 1e9)


_FIELD_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"


class RoutingSection(WireModel):
    """How the router recognises a user for sticky canary stages (header preferred), and
    whether it names the answering revision in a response header."""

    sticky_header: Annotated[str, Field(pattern=_FIELD_NAME)] | None = Field(
        default=None,
        description="Request header whose value keys a user (e.g. `x-user-id`); canary stages "
        "with `sticky = true` keep each key on one side, moving keys only stable -> canary.",
    )
    sticky_cookie: Annotated[str, Field(pattern=_FIELD_NAME)] | None = Field(
        default=None,
        description="Cookie whose value keys a user, used when the header is absent (e.g. "
        "`session`).",
    )
    revision_header: bool = Field(
        default=False,
        description="Add `x-shipyard-revision: <revision>` to every response the router "
        "forwards, to see which revision answered while debugging a canary. Off by default: it "
        "tells clients which build served them.",
    )


class FleetSection(WireModel):
    """How a deployment across several regions (``target.regions``) treats a silent region."""

    region_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=30.0,
        description="How long a fleet deployment waits at a barrier for a region that stopped "
        "answering before it rolls back every region it can reach (and ends `RolledBack`; the "
        "silent region is brought to the decided state when it answers again).",
    )


class Manifest(WireModel):
    """``shipyard.toml``: one table per section."""

    service: ServiceSection = Field(description="Who this is.")
    build: BuildSection = Field(
        default_factory=BuildSection,
        description="How the commit becomes an artifact. Builds run sandboxed as the "
        "service's own uid with a clean environment: `PATH` /usr/local/bin:/usr/bin:/bin, "
        "their own `HOME`, `TMPDIR` and `XDG_CACHE_HOME`, `LANG=C.UTF-8`, "
        "`SOURCE_DATE_EPOCH`; nothing of the server's.",
    )
    run: RunSection = Field(
        default_factory=RunSection,
        description="How a replica starts (for a directory artifact, `command` is required).",
    )
    health: HealthCheck = Field(
        default_factory=HealthCheck,
        description="The health check every gate uses (the ADR's HealthCheck); "
        "fractional seconds allowed.",
    )
    #: Canary analysis defaults for this service; a stage's ``analysis`` overrides them.
    analysis: AnalysisSettings = Field(
        default_factory=AnalysisSettings,
        description="Canary analysis defaults for this service (Argo Rollouts' "
        "semantics); a stage's own `analysis` wins, and unset keys take the built-in defaults.",
    )
    routing: RoutingSection = Field(
        default_factory=RoutingSection,
        description="The user key that canary stages with `sticky = true` use, and whether the "
        "router names the revision that answered (`x-shipyard-revision`).",
    )
    fleet: FleetSection = Field(
        default_factory=FleetSection,
        description="Deployments across several regions (`target.regions`).",
    )
    hooks: HooksSection = Field(
        default_factory=HooksSection,
        description="Commands run in the candidate's artifact at four points of a deployment "
        "(migrations before it starts, smoke tests before its first traffic, ...). Each is "
        "recorded as a stage, its output goes to the deployment's log, and it is audited.",
    )
    gates: list[GateSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Webhook gates (`[[gates]]`): Shipyard POSTs the deployment's summary and "
        "goes on only on a 2xx. Each answer is recorded and audited.",
    )
    deploy: DeploySection = Field(
        default_factory=DeploySection,
        description="What a failed check does: roll back (default) or freeze.",
    )
    #: Security policy (block thresholds, expiring allow-list); validated by security/policy.py.
    security: dict[str, Any] | None = Field(
        default=None,
        description="The security gate's policy for this service (default: block "
        "critical, CVSS >= 9.0).",
    )

    @property
    def builds_image(self) -> bool:
        """Whether the builder makes an OCI image (run as containers) rather than a directory."""
        return self.build.builder in IMAGE_BUILDERS

    @model_validator(mode="after")
    def _gates_named_once(self) -> Manifest:
        check_gates(self.gates)
        return self

    @model_validator(mode="after")
    def _run_fits_artifact(self) -> Manifest:
        """A directory artifact needs a command; container-only keys need an image."""
        if self.builds_image:
            return self
        if self.run.command is None:
            raise ValueError(
                "[run] command is required: a directory artifact has no entry point of its own "
                '(only images built with [build] builder = "docker" run their ENTRYPOINT/CMD)'
            )
        image_only = [k for k in ("port", "memory", "cpus") if getattr(self.run, k) is not None]
        if image_only:
            raise ValueError(
                f"[run] {', '.join(image_only)} appl{'ies' if len(image_only) == 1 else 'y'} to "
                f'containers only, but [build] builder = "{self.build.builder}" builds a '
                "directory run as processes (a process gets its port in PORT); remove "
                f"{'it' if len(image_only) == 1 else 'them'} or build an image with "
                '[build] builder = "docker"'
            )
        return self


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
            # A whole-manifest rule names its keys itself ("[run] command is required ...").
            f"{'.'.join(str(p) for p in err['loc'])}: {_reason(err['msg'])}"
            if err["loc"]
            else _reason(err["msg"])
            for err in exc.errors()
        ]
        raise ManifestError(f"{origin}: " + "; ".join(problems), problems=problems) from exc


def _reason(msg: str) -> str:
    """pydantic's message for a validator's ValueError, without its "Value error, " prefix."""
    return msg.removeprefix("Value error, ")


def load_manifest(repo_dir: Path) -> Manifest:
    """Read ``shipyard.toml`` from a checked-out tree."""
    path = repo_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{MANIFEST_NAME} not found at the repository root; add one with [service] name and "
            "[run] command (see README)"
        )
    return parse_manifest(path.read_text(encoding="utf-8", errors="replace"))
