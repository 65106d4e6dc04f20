"""Server configuration: where data lives, which regions exist, and the pipeline's defaults.

Built by the CLI (``shipyard serve``) from flags and environment; the API app and the orchestrator
receive it. Everything has a sensible default so ``shipyard serve --data-dir DIR`` is enough.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shipyard.build.base import DEFAULT_MAX_LOG_BYTES
from shipyard.build.source_policy import DEFAULT_PATTERNS, SourcePolicy, default_roots
from shipyard.notify.config import ServerConfig
from shipyard.orchestrator.log_retention import LogRetention
from shipyard.sandbox import SandboxPolicy

DEFAULT_REGION = "local"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    data_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("SHIPYARD_DATA_DIR", ".shipyard"))
    )
    #: The store (``--database`` / ``SHIPYARD_DATABASE``, ``store/engine.py``): None is SQLite
    #: in ``data_dir``; a ``postgresql://`` URL is the store replicas share. Out of ``repr``: it
    #: may carry a password.
    database: str | None = Field(
        default_factory=lambda: os.environ.get("SHIPYARD_DATABASE") or None, repr=False
    )
    #: Cluster-wide files every replica must see (``--shared-dir``, default the data directory):
    #: keys/, fleet/ + fleet.json, attestations/, deployments/, logs/, artifacts/. The data
    #: directory keeps what is this replica's own (agents/, build workspaces and caches, the
    #: audit anchor).
    shared_dir: Path = Field(default_factory=lambda data: data["data_dir"])
    #: Regions served by a local agent each (``--region``; empty with ``--no-local-agent``:
    #: only joined regions). ``target.region`` must name one of them or a joined one.
    regions: tuple[str, ...] = (DEFAULT_REGION,)
    #: Largest request body the API accepts.
    max_body_bytes: int = 64 * 1024
    #: How long to let in-flight requests finish on a revision being stopped.
    drain_timeout_seconds: float = 30.0
    #: OSV database for the security gate (issue 4); None = gate disabled.
    osv_db: Path | None = None
    #: How build commands are confined (``shipyard.sandbox``); None: sandboxed with the defaults
    #: (``SandboxPolicy(data_dir)``). Only ``--insecure-no-sandbox`` turns it off.
    sandbox: SandboxPolicy | None = None

    #: The longest lifetime a token may have (``--max-token-ttl-days``): longer ones are
    #: neither issued nor accepted.
    max_token_ttl_seconds: int = Field(default=90 * 24 * 3600, gt=0)
    #: Four eyes: a paused deployment must be promoted by another subject than the one who
    #: deployed it (``--four-eyes``).
    four_eyes: bool = False
    #: This replica's name in the leases (``--replica-id``; ``serve`` defaults it to
    #: HOSTNAME:PORT). None: the host name.
    replica_id: str | None = None
    #: How long a lease lasts without renewal (``--lease-seconds``): a replica that dies loses
    #: its deployments to another within it.
    lease_seconds: float = Field(default=10.0, gt=0)

    #: Where audit checkpoints are published (file paths outside data_dir, http(s) URLs); empty:
    #: none, and ``shipyard audit verify`` says only internal consistency is proven.
    witnesses: tuple[str, ...] = ()
    #: With a file witness: also append every checkpoint here.
    witness_history: Path | None = None
    #: Seconds between two checkpoint publications (one also follows every deployment's end).
    checkpoint_interval_seconds: float = Field(default=60.0, gt=0)
    #: ``serve --config FILE`` (``notify/config.py``): its notification sinks replace the
    #: previous file's at start, and its retry cap; None (no file): the stored sinks stay as
    #: they are. Out of ``repr``: it holds HMAC keys and Slack URLs.
    server_config: ServerConfig | None = Field(default=None, repr=False)

    #: The API's edge (``api/edge.py``, ``api/limits.py``), enforced before authentication:
    #: the request line and headers together (h11 answers 400 past it), the number of header
    #: lines (431), how long a client has to send a whole request, head and body (slowloris:
    #: closed, 408 when part of a head arrived), how long an idle keep-alive connection stays,
    #: requests in flight (503 past it) and open connections (closed at once past it).
    max_head_bytes: int = Field(default=16 * 1024, gt=0)
    max_header_count: int = Field(default=100, gt=0)
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    keep_alive_timeout_seconds: int = Field(default=15, gt=0)
    max_concurrent_requests: int = Field(default=256, gt=0)
    max_connections: int = Field(default=4096, gt=0)
    #: TLS for the API (``--tls-cert``/``--tls-key``): both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: ``/docs``, ``/redoc`` and ``/openapi.json`` (``--no-docs`` turns them off).
    docs: bool = True
    #: Builds at once; the others wait in a queue (``--max-concurrent-builds``).
    max_concurrent_builds: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1)
    #: A build's log stops growing past this, with a notice (``--max-build-log-mb``).
    max_build_log_bytes: int = Field(default=DEFAULT_MAX_LOG_BYTES, ge=4096)
    #: Build logs older than this are deleted (``--build-log-retention-days``); None: no limit.
    build_log_retention_days: float | None = Field(default=30.0, gt=0)
    #: Only the newest this many build logs (of each kind) are kept; None: no limit.
    build_log_retention_count: int | None = Field(default=500, ge=1)
    #: Remote repositories allowed (fnmatch patterns, ``--allow-source``).
    allowed_sources: tuple[str, ...] = DEFAULT_PATTERNS
    #: Directories local repositories may be under (``--source-root``); None: the current
    #: directory and the temporary directory (``build.source_policy.default_roots``).
    source_roots: tuple[Path, ...] | None = None
    #: A ``logs?follow=true`` stream ends after this, with a cursor to resume from (the CLI
    #: resumes on its own), so no request lives for ever.
    log_follow_max_seconds: float = Field(default=3600.0, gt=0)
    #: Every image built is pushed to this OCI registry (``--registry``, host[:port][/path])
    #: and deployed by digest from it; None: images stay in the engine that built them.
    image_registry: str | None = None
    #: The fleet listener remote agents join and renew through (``--fleet-listen``; None: off)
    #: and how long their certificates live (``--fleet-cert-ttl``), see api/fleet.py.
    fleet_listen: tuple[str, int] | None = None
    fleet_cert_ttl_seconds: float = Field(default=3600.0, gt=0)

    @property
    def builder_settings(self) -> dict[str, dict[str, Any]]:
        """``BuildConfig.builders`` from the server's flags (the docker builder's registry)."""
        return {} if self.image_registry is None else {"docker": {"registry": self.image_registry}}

    @property
    def sandbox_policy(self) -> SandboxPolicy:
        return self.sandbox or SandboxPolicy(data_dir=self.data_dir, hide=(self.shared_dir,))

    @property
    def source_policy(self) -> SourcePolicy:
        """What ``source.repository`` may name; never the data or shared directory."""
        roots = default_roots() if self.source_roots is None else self.source_roots
        forbidden = tuple(dict.fromkeys((self.data_dir, self.shared_dir)))
        return SourcePolicy(self.allowed_sources, roots, forbidden=forbidden)

    @property
    def log_retention(self) -> LogRetention:
        days = self.build_log_retention_days
        return LogRetention(
            days * 86400 if days is not None else None, self.build_log_retention_count
        )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "shipyard.db"

    @property
    def audit_anchor(self) -> Path:
        return self.data_dir / "audit.head"
