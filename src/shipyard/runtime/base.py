"""The data-plane contract: where revisions run, per region.

A ``Runtime`` starts and stops revisions (each with one or more replicas) and reports their
replicas; it also exposes the region's ``TrafficRouter`` (routing/base.py). The orchestrator only
sees these protocols. Backends: ``runtime.local`` (the embedded agent), ``runtime.fake`` (in-memory,
same contract); Docker, Kubernetes and Cloud Run slot in beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from shipyard.domain.hostnames import parse_host_rule
from shipyard.routing.base import TrafficRouter

#: What a revision's artifact is: a content-addressed directory tree (run as sandboxed processes)
#: or an OCI image (run as containers).
ArtifactKind = Literal["directory", "oci-image"]
ReplicaState = Literal["starting", "running", "exited", "crashed", "stopping", "stopped"]
#: Which of a replica's outputs a log line came from.
LogStream = Literal["stdout", "stderr"]

#: The most lines one ``read_logs`` answers (``LogQuery.tail``'s upper bound).
MAX_LOG_LINES = 10_000


@dataclass(frozen=True)
class EntrySpec:
    """How a service is reached on its data plane, from the manifest's ``[service]`` keys:
    host names on the shared listeners, its own port, the HTTPS redirect and HSTS. Service-wide:
    the agent applies the one of the revision it was asked to start last."""

    #: Host rules (``domain.hostnames``): ``name``, ``*.name`` or ``name/path-prefix``.
    hosts: tuple[str, ...] = ()
    #: The service's own listener port; None: the runtime picks one.
    port: int | None = None
    https_redirect: bool = False
    #: Strict-Transport-Security max-age on HTTPS responses; 0: none.
    hsts_max_age: int = 0
    #: ``x-shipyard-revision: <revision>`` on every response the router forwards (the
    #: manifest's ``[routing] revision_header``; off by default: it tells clients which build
    #: served them). Sent to an agent only when true, so an agent from before it still accepts
    #: every spec that does not ask for it.
    revision_header: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EntrySpec:
        """ValueError (naming the field) for anything the manifest would have refused."""
        unknown = set(d) - {"hosts", "port", "https_redirect", "hsts_max_age", "revision_header"}
        if unknown:
            raise ValueError(f"unknown entry field(s): {', '.join(sorted(unknown))}")
        hosts = d.get("hosts", ())
        if not isinstance(hosts, list | tuple) or len(hosts) > 64:
            raise ValueError("entry hosts must be a list of at most 64 host names")
        rules = tuple(dict.fromkeys(str(parse_host_rule(h)) for h in hosts))
        port = d.get("port")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
        ):
            raise ValueError(f"entry port must be 1-65535, got {port!r}")
        redirect = d.get("https_redirect", False)
        hsts = d.get("hsts_max_age", 0)
        if not isinstance(redirect, bool):
            raise ValueError("entry https_redirect must be true or false")
        if isinstance(hsts, bool) or not isinstance(hsts, int) or not 0 <= hsts <= 63_072_000:
            raise ValueError(f"entry hsts_max_age must be 0-63072000 seconds, got {hsts!r}")
        revision_header = d.get("revision_header", False)
        if not isinstance(revision_header, bool):
            raise ValueError("entry revision_header must be true or false")
        return cls(rules, port, redirect, hsts, revision_header)


@dataclass(frozen=True)
class ContainerSpec:
    """How an image revision's containers run, from the manifest's ``[run]`` keys for images.

    ``port`` is the port the app listens on inside the container (``PORT`` is set to it) when
    the runtime publishes it on the host; a runtime on host networking gives each replica a
    host port of its own in ``PORT`` instead. None: the image's own (``EXPOSE``), else 8080.
    """

    port: int | None = None
    #: Memory limit in bytes (``[run] memory = "256m"``); None: no limit.
    memory_bytes: int | None = None
    #: CPU limit in units of 1e-9 CPUs (``[run] cpus = 0.5`` is 500_000_000); None: no limit.
    nano_cpus: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContainerSpec:
        """ValueError (naming the field) for anything the manifest would have refused."""
        unknown = set(d) - {"port", "memory_bytes", "nano_cpus"}
        if unknown:
            raise ValueError(f"unknown container field(s): {', '.join(sorted(unknown))}")
        port, memory, cpus = d.get("port"), d.get("memory_bytes"), d.get("nano_cpus")
        for name, value, low, high in (
            ("port", port, 1, 65535),
            ("memory_bytes", memory, 6 * 2**20, 2**50),
            ("nano_cpus", cpus, 10**7, 1024 * 10**9),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
            ):
                raise ValueError(f"container {name} must be {low}-{high}, got {value!r}")
        return cls(port, memory, cpus)


@dataclass(frozen=True)
class RevisionSpec:
    """Everything a runtime needs to run one revision of a service."""

    service: str
    revision: str
    artifact_digest: str
    #: Artifact location: a directory (local runtime) or an image reference (docker, k8s).
    artifact_location: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    #: The manifest's ``[health] endpoint`` (a path such as ``/health``). A runtime that restarts
    #: a crashed replica sends it traffic again only once this answers 2xx; None: once its port
    #: accepts a connection.
    health_endpoint: str | None = None
    #: The security gate's DSSE envelope over the artifact's provenance (a JSON object), which
    #: a runtime that verifies artifacts itself (the local agent) checks against
    #: ``artifact_digest`` before it starts anything. None: unsigned (such a runtime refuses it).
    provenance: Mapping[str, Any] | None = None
    #: Host names, port, redirect and HSTS for the service (the manifest's ``[service]``);
    #: None: leave what the runtime has (a spec from before these keys existed).
    entry: EntrySpec | None = None
    #: ``oci-image``: ``artifact_digest`` is the image ID and ``artifact_location`` the image
    #: reference it was built or pushed as; an empty ``argv`` runs the image's ENTRYPOINT/CMD.
    artifact_kind: ArtifactKind = "directory"
    #: Image revisions only: port and resource limits (None: the defaults).
    container: ContainerSpec | None = None
    #: Seconds a replica has to exit after the stop signal (``[run] stop_timeout_seconds``);
    #: then it is killed. Draining the router's requests to it comes before the signal.
    stop_timeout: float = 10.0
    #: The service's secrets as environment variables (``[run] secrets``), set after ``env``
    #: (``PORT`` and ``SHIPYARD_*`` still win); values, so never in a repr, a log or a record:
    #: ``orchestrator/artifacts.spec`` fills them in for the runtime only.
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: ``[run] secret_files``: file name -> value, written by the agent into a private
    #: directory (0700, files 0400) the replica finds in ``SHIPYARD_SECRETS_DIR``.
    secret_files: Mapping[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The spec as the agent receives it (over its local socket or mutual TLS): the
        secrets' values included, so never log what this returns."""
        d = asdict(self)
        d["argv"] = list(self.argv)
        d["env"] = dict(self.env)
        for key in ("secret_env", "secret_files"):  # absent when empty: what older agents read
            if d[key]:
                d[key] = dict(d[key])
            else:
                del d[key]
        d["provenance"] = dict(self.provenance) if self.provenance is not None else None
        if self.entry is None:
            del d["entry"]  # what an agent from before entry specs accepts
        else:
            d["entry"]["hosts"] = list(self.entry.hosts)
            if not self.entry.revision_header:
                del d["entry"]["revision_header"]  # see EntrySpec.revision_header
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RevisionSpec:
        """ValueError for a malformed ``entry`` or ``container``."""
        entry, container = d.get("entry"), d.get("container")
        fields = {k: v for k, v in d.items() if k not in ("entry", "container")}
        return cls(
            **fields,
            entry=EntrySpec.from_dict(entry) if entry is not None else None,
            container=ContainerSpec.from_dict(container) if container is not None else None,
        )


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    revision: str
    host: str
    port: int
    state: ReplicaState
    #: Whether the router may send it traffic (set by the orchestrator after health gating).
    routable: bool = True
    pid: int | None = None
    exit_code: int | None = None
    #: How many times the runtime started this replica again after it exited on its own (the
    #: replica keeps its id; its pid and port change). Never reset, like Kubernetes'.
    restarts: int = 0
    log_path: str | None = None
    #: The exit code of the process before the latest restart (None: never restarted).
    last_exit_code: int | None = None
    #: Seconds until a pending restart (the replica is then ``crashed`` or ``exited``, waiting
    #: out its backoff); None when no restart is pending.
    next_restart_in: float | None = None
    #: The container running it (image revisions on the local agent; None for a process).
    container_id: str | None = None

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplicaStatus:
        return cls(**d)


@dataclass(frozen=True)
class ServiceState:
    """What the data plane reports for one service."""

    service: str
    url: str
    weights: Mapping[str, int]
    replicas: Sequence[ReplicaStatus]

    def revisions(self) -> set[str]:
        return {r.revision for r in self.replicas if r.alive}


@dataclass(frozen=True)
class StickyKey:
    """What identifies a user for sticky canary weights: a header (preferred) and/or a cookie."""

    header: str | None = None
    cookie: str | None = None


class MeteredRouter(TrafficRouter, Protocol):
    """The router as the orchestrator uses it: weights (optionally sticky) and its own
    per-revision metrics, which canary analysis judges."""

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        """Route ``weights`` atomically. With ``sticky``, a request carrying the key goes to the
        revision its hash falls on, by cumulative ranges in the order of ``weights`` (so pass the
        canary first: raising its weight only moves users stable -> canary). None clears it."""
        ...

    async def metrics(self, service: str) -> Mapping[str, Mapping[str, Any]]:
        """``{revision: RevisionMetrics.to_dict()}``: counters since the router started."""
        ...


@runtime_checkable
class LoadDriver(Protocol):
    """A router that can drive load to one revision itself: canary analysis's built-in load step
    (``[analysis] load``, Flagger's load tester). Optional: the Analyse executor checks
    ``isinstance(router, LoadDriver)`` and says so when a runtime cannot."""

    async def drive_load(
        self, service: str, revision: str, rps: float, path: str, *, lease_seconds: float
    ) -> Mapping[str, Any]:
        """Send ``GET path`` at ``rps`` through ``service``'s route to ``revision`` only, so the
        requests count in its metrics; for ``lease_seconds`` from now unless called again (the
        same load renews its lease; another replaces it). Answers what the load did so far."""
        ...

    async def stop_load(self, service: str) -> Mapping[str, Any] | None:
        """Stop ``service``'s load (idempotent); what it did, or None if none ran."""
        ...


@dataclass(frozen=True)
class LogLine:
    """One line a replica printed, as the runtime stored it (masked of every secret it knows)."""

    #: When the runtime read the line from the replica (seconds since the epoch).
    timestamp: float
    replica_id: str
    revision: str
    stream: LogStream
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogLine:
        return cls(**d)


@dataclass(frozen=True)
class LogQuery:
    """Which of a service's replica logs ``Runtime.read_logs`` returns.

    Without ``after``: the last ``tail`` lines (across the matching replicas, by time) with a
    timestamp at or after ``since``. With ``after`` (the ``cursor`` of an earlier batch): the
    first ``tail`` lines written after that batch, for following; a replica the cursor does not
    name (started since) is read from its beginning. A runtime may return fewer lines to bound
    an answer's size (the agent: about 4 MiB of text); the cursor then covers only what came.
    """

    revision: str | None = None
    replica_id: str | None = None
    tail: int = 200
    since: float | None = None
    after: Mapping[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["after"] = dict(self.after) if self.after is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogQuery:
        return cls(**d)


@dataclass(frozen=True)
class LogBatch:
    """Lines oldest first, and where each matching replica's log was read up to: pass it back as
    ``LogQuery.after`` to get only what comes next (positions are opaque to callers)."""

    lines: Sequence[LogLine]
    cursor: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"lines": [line.to_dict() for line in self.lines], "cursor": dict(self.cursor)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogBatch:
        return cls(
            lines=[LogLine.from_dict(x) for x in d["lines"]],
            cursor={str(k): int(v) for k, v in d["cursor"].items()},
        )


#: The most bytes of a hook's output a runtime streams back (then it counts what it dropped).
MAX_HOOK_OUTPUT_BYTES = 4 * 2**20


@dataclass(frozen=True)
class HookRun:
    """One ``[hooks]`` command to run once in a revision's artifact (``Runtime.run_hook``)."""

    #: Where in the deployment it runs (``pre_deploy``, ...): the process sees it as
    #: ``SHIPYARD_HOOK``.
    point: str
    argv: Sequence[str]
    #: Past this the runtime kills it, and reports ``timed_out``.
    timeout_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "argv": list(self.argv),
            "timeout_seconds": self.timeout_seconds,
        }


@dataclass(frozen=True)
class HookResult:
    """How a hook ended: its exit code (None: killed at its timeout, or it never got one),
    how long it ran, and how many lines of its output the runtime dropped (bounded)."""

    exit_code: int | None
    duration_ms: int
    timed_out: bool = False
    dropped_lines: int = 0

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HookResult:
        code = d.get("exit_code")
        return cls(
            exit_code=None if code is None else int(code),
            duration_ms=int(d.get("duration_ms", 0)),
            timed_out=bool(d.get("timed_out", False)),
            dropped_lines=int(d.get("dropped_lines", 0)),
        )


class Runtime(Protocol):
    kind: str
    region: str

    @property
    def router(self) -> MeteredRouter:
        """The region's traffic router."""
        ...

    async def ensure_service(self, service: str) -> str:
        """Create the service's stable endpoint if needed (idempotent); returns its URL."""
        ...

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        """Start ``spec.replicas`` replicas with no traffic; idempotent for a running revision.

        New replicas are not routable until ``set_routable``. Raises RevisionStartFailed.
        """
        ...

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        """Let (or stop letting) the router send new requests to these replicas."""
        ...

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        """Stop routing to the replicas, let their in-flight requests finish, then stop them."""
        ...

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        """Drain and stop every replica of a revision (idempotent)."""
        ...

    async def service_state(self, service: str) -> ServiceState | None: ...

    async def read_logs(self, service: str, query: LogQuery) -> LogBatch:
        """What the service's replicas printed (stdout and stderr, a timestamp per line), also
        of replicas stopped since, as long as the runtime keeps their logs. NotFound for a
        service, revision or replica it holds no logs of."""
        ...

    async def list_services(self) -> list[str]: ...

    async def run_hook(
        self, spec: RevisionSpec, hook: HookRun, on_output: Callable[[str], None]
    ) -> HookResult:
        """Run ``hook`` once, to its end, as a one-off process of ``spec`` (a one-off container
        for an image): its artifact verified as ``start_revision`` verifies it, the replicas'
        sandbox, user and environment (no ``PORT``), no traffic. Each line it prints (stdout
        and stderr as one stream) goes to ``on_output`` as it comes, bounded by
        ``MAX_HOOK_OUTPUT_BYTES``. A non-zero exit or a timeout is a result, not an error;
        a hook that cannot start raises (``ArtifactVerificationFailed``,
        ``RevisionStartFailed``, ``AgentUnavailable``)."""
        ...
