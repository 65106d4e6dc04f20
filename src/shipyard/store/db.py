"""Deployment state: the durable half of every deployment's state machine.

SQLite in WAL mode in the data directory (``shipyard.db``) is the embedded default, PostgreSQL
the store several control-plane replicas share (``store/engine.py`` opens either; its Alembic
migrations make the tables, the Table objects here are for queries). Every query is written to
mean the same on both. The orchestrator writes a deployment's document before each action; a
partial unique index enforces one active deployment per service even when two requests race.
The audit log (audit/log.py) keeps its own tables in the same database.

Tables: ``deployments`` (one JSON document per deployment plus the columns we query by),
``revisions`` (what ran, so a rollback can restart it), ``services`` (which revision serves, which
one is kept warm until when), ``service_scale`` (a replica count set by ``shipyard scale``).
What the documents say is the orchestrator's business (``orchestrator/record.py`` types and
versions them); here they are JSON.

``Store`` is synchronous; the event loop uses ``AsyncStore``, which runs every call in a worker
thread, so the API keeps answering while SQLite waits on a lock (``busy_timeout``, up to 5 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    cast,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from shipyard.domain.clock import to_thread
from shipyard.errors import DeploymentInProgress, InvariantViolation, NotFound
from shipyard.store import leases

_P = ParamSpec("_P")
_T = TypeVar("_T")

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("service", String(63), nullable=False),
    Column("region", String(63), nullable=False),
    Column("status", String(32), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("doc", Text, nullable=False),
    Index("ix_deployments_service", "service", "created_at"),
    Index(
        "ux_one_active_per_service",
        "service",
        "region",
        unique=True,
        sqlite_where=text("active = 1"),
        postgresql_where=text("active"),
    ),
)

revisions = Table(
    "revisions",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("service", String(63), nullable=False),
    Column("region", String(63), nullable=False),
    Column("deployment_id", String(36), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("spec", Text, nullable=False),
)

services = Table(
    "services",
    metadata,
    Column("service", String(63), primary_key=True),
    Column("region", String(63), primary_key=True),
    Column("serving_revision", String(128)),
    Column("warm_revision", String(128)),
    Column("warm_until", Float),
    Column("url", String(256)),
)

#: ``shipyard scale``: the replica count an operator set for the revision serving then
#: (``orchestrator/services.py``); the reconciler keeps it while that revision serves.
service_scale = Table(
    "service_scale",
    metadata,
    Column("service", String(63), primary_key=True),
    Column("region", String(63), primary_key=True),
    Column("revision", String(128), nullable=False),
    Column("replicas", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)


@dataclass(frozen=True)
class ScaleRow:
    """The replica count set by ``shipyard scale`` for ``revision`` of a service."""

    service: str
    region: str
    revision: str
    replicas: int
    updated_at: float


@dataclass(frozen=True)
class ServiceRow:
    service: str
    region: str
    serving_revision: str | None
    warm_revision: str | None
    warm_until: float | None
    url: str | None


class Store:
    """Synchronous, small and fast (SQLite commits are sub-millisecond in WAL mode)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction, refused (LeaseLost) when the calling task's lease moved on."""
        with self.engine.begin() as conn:
            leases.check_fence(conn)
            yield conn

    # --- deployments ---------------------------------------------------------------------------

    def create_deployment(
        self, doc: dict[str, Any], *, active: bool = True, lease: leases.LeaseClaim | None = None
    ) -> None:
        """Insert a new deployment, its ``active_regions`` and (``lease``) the lease of the
        replica that drives it, in one transaction; DeploymentInProgress if the service already
        has one in flight in any of its regions, whichever replica started it."""
        regions = leases.regions_of(doc)
        try:
            with self._tx() as conn:
                conn.execute(
                    insert(deployments).values(
                        id=doc["id"],
                        service=doc["service"],
                        region=doc["region"],
                        status=doc["status"],
                        active=active,
                        created_at=doc["created_ts"],
                        doc=json.dumps(doc),
                    )
                )
                if active:
                    leases.claim_regions(conn, doc["id"], doc["service"], regions)
                if lease is not None:
                    leases.insert_lease(conn, leases.deployment_lease(doc["id"]), lease)
        except IntegrityError as exc:
            with self.engine.connect() as conn:
                found = leases.running_in(conn, doc["service"], regions)
            region, running = found if found else (doc["region"], None)
            raise in_progress(doc["service"], region, running) from exc

    def save_deployment(self, doc: dict[str, Any], *, active: bool) -> None:
        with self._tx() as conn:
            conn.execute(
                update(deployments)
                .where(deployments.c.id == doc["id"])
                .values(status=doc["status"], active=active, doc=json.dumps(doc))
            )
            if not active:
                leases.release_regions(conn, doc["id"])

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(deployments.c.doc).where(deployments.c.id == deployment_id)
            ).first()
        if row is None:
            raise NotFound(f"deployment {deployment_id} not found")
        doc: dict[str, Any] = json.loads(row[0])
        return doc

    def deployment_ids_with_prefix(self, prefix: str, limit: int = 100) -> list[tuple[str, str]]:
        """``(id, service)`` of the deployments whose id starts with ``prefix`` (lower-case
        hex and ``-``, so nothing in it is a LIKE wildcard), at most ``limit``, by id."""
        q = (
            select(deployments.c.id, deployments.c.service)
            .where(deployments.c.id.startswith(prefix, autoescape=True))
            .order_by(deployments.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(str(i), str(s)) for i, s in conn.execute(q).all()]

    def active_deployment(self, service: str, region: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(deployments.c.doc).where(
                    deployments.c.service == service,
                    deployments.c.region == region,
                    deployments.c.active.is_(True),
                )
            ).first()
        return json.loads(row[0]) if row else None

    def active_deployments(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(deployments.c.doc)
                .where(deployments.c.active.is_(True))
                .order_by(deployments.c.created_at)
            ).all()
        return [json.loads(r[0]) for r in rows]

    def count_deployments(self) -> dict[tuple[str, str], int]:
        """(kind, status) -> number of deployments, for ``/metrics``."""
        kind = doc_field(self.engine.dialect.name, deployments.c.doc, "kind").label("kind")
        # Grouped outside: PostgreSQL sees the same expression twice as two different ones (each
        # with its own bind parameter) and refuses to group by it.
        inner = select(kind, deployments.c.status).subquery()
        q = select(inner.c.kind, inner.c.status, func.count()).group_by(
            inner.c.kind, inner.c.status
        )
        with self.engine.connect() as conn:
            return {(str(k), str(s)): int(n) for k, s, n in conn.execute(q).all()}

    def deployment_statuses(self) -> list[tuple[str, str]]:
        """``(id, status)`` of every deployment: two short columns, no document. ``/metrics``
        (api/metrics_history.py) reads it on each scrape and fetches only the documents it has
        not seen finished."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(deployments.c.id, deployments.c.status)).all()
        return [(str(i), str(s)) for i, s in rows]

    def get_deployments(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The documents of ``ids`` that exist (any order), read in batches of 500 ids."""
        docs: list[dict[str, Any]] = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                batch = list(ids[start : start + 500])
                q = select(deployments.c.doc).where(deployments.c.id.in_(batch))
                docs.extend(json.loads(r[0]) for r in conn.execute(q).all())
        return docs

    def list_deployments(
        self, service: str | None = None, limit: int = 50, *, matching: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` deployments (of ``service``), newest first. ``matching``: only
        services matching one of these globs (``*``, ``?``; a token's service scopes), filtered
        here so ``limit`` counts what the caller may see."""
        q = select(deployments.c.doc).order_by(deployments.c.created_at.desc()).limit(limit)
        if service is not None:
            q = q.where(deployments.c.service == service)
        if matching is not None:
            q = q.where(
                or_(false(), *(deployments.c.service.like(glob_to_like(g), "\\") for g in matching))
            )
        with self.engine.connect() as conn:
            return [json.loads(r[0]) for r in conn.execute(q).all()]

    # --- revisions -------------------------------------------------------------------------------

    def save_revision(
        self,
        revision: str,
        service: str,
        region: str,
        deployment_id: str,
        spec: dict[str, Any],
        ts: float,
    ) -> None:
        """Record what ``revision`` runs, once: the first record of a revision id stays."""
        try:
            with self._tx() as conn:
                exists = conn.execute(
                    select(revisions.c.id).where(revisions.c.id == revision)
                ).first()
                if exists is None:
                    conn.execute(
                        insert(revisions).values(
                            id=revision,
                            service=service,
                            region=region,
                            deployment_id=deployment_id,
                            created_at=ts,
                            spec=json.dumps(spec),
                        )
                    )
        except IntegrityError:
            # Another replica recorded it between our read and our insert: the first stays.
            with self.engine.connect() as conn:
                found = conn.execute(
                    select(revisions.c.id).where(revisions.c.id == revision)
                ).first()
            if found is None:
                raise

    def get_revision_spec(self, revision: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(revisions.c.spec).where(revisions.c.id == revision)).first()
        if row is None:
            raise NotFound(f"revision {revision} not found")
        spec: dict[str, Any] = json.loads(row[0])
        return spec

    def has_directory_artifact(self, digest: str) -> bool:
        """Whether a recorded revision is the directory artifact ``digest`` (what the fleet
        listener may send an agent, ``api.fleet_artifacts``). The text match narrows the scan
        (specs are stored as ``json.dumps`` writes them); the parsed spec decides."""
        needle = json.dumps({"artifact_digest": digest})[1:-1]
        q = select(revisions.c.spec).where(revisions.c.spec.contains(needle, autoescape=True))
        with self.engine.connect() as conn:
            for (doc,) in conn.execute(q):
                spec = json.loads(doc)
                if spec.get("artifact_digest") == digest and (
                    spec.get("artifact_kind", "directory") == "directory"
                ):
                    return True
        return False

    # --- services ------------------------------------------------------------------------------

    def get_service(self, service: str, region: str) -> ServiceRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(services).where(services.c.service == service, services.c.region == region)
            ).first()
        return ServiceRow(**row._mapping) if row else None

    def list_services(self) -> list[ServiceRow]:
        with self.engine.connect() as conn:
            return [ServiceRow(**r._mapping) for r in conn.execute(select(services)).all()]

    def upsert_service(self, service: str, region: str, **values: Any) -> ServiceRow:
        """Create or change a service's record in one transaction; returns the new record.

        The record may never say something false, so the write is refused
        (``InvariantViolation``) when it would leave the serving revision also marked warm: the
        janitor retires warm revisions when their window ends, and retiring the one that serves
        is an outage. Callers that make a warm revision serve again clear ``warm_revision`` in
        the same call (``orchestrator.serving.mark_serving``).
        """
        unknown = set(values) - set(ServiceRow.__dataclass_fields__) - {"service", "region"}
        if unknown:
            raise TypeError(f"unknown service fields: {sorted(unknown)}")
        try:
            return self._upsert_service(service, region, values)
        except IntegrityError:
            # Two writers both found no row and both inserted: the row exists now, so this
            # second try reads it (locked) and updates it.
            return self._upsert_service(service, region, values)

    def _upsert_service(self, service: str, region: str, values: dict[str, Any]) -> ServiceRow:
        with self._tx() as conn:
            found = conn.execute(
                select(services)
                .where(services.c.service == service, services.c.region == region)
                .with_for_update()
            ).first()
            current = (
                ServiceRow(**found._mapping)
                if found
                else ServiceRow(service, region, None, None, None, None)
            )
            row = dataclasses.replace(current, **values)
            check_service_row(row)
            if found:
                conn.execute(
                    update(services)
                    .where(services.c.service == service, services.c.region == region)
                    .values(**values)
                )
            else:
                conn.execute(insert(services).values(service=service, region=region, **values))
        return row

    def delete_service(self, service: str, region: str) -> None:
        """Forget a service (``shipyard service delete``): its record and its scale. Its
        deployments and revisions stay, as the history and the audit trail refer to them."""
        with self._tx() as conn:
            for table in (services, service_scale):
                conn.execute(
                    delete(table).where(table.c.service == service, table.c.region == region)
                )

    # --- scale ---------------------------------------------------------------------------------

    def get_scale(self, service: str, region: str) -> ScaleRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(service_scale).where(
                    service_scale.c.service == service, service_scale.c.region == region
                )
            ).first()
        return ScaleRow(**row._mapping) if row else None

    def set_scale(self, service: str, region: str, revision: str, replicas: int, ts: float) -> None:
        """Set (or replace) the count in one statement: an upsert, so writers racing on
        several replicas each land whole, the last one winning (a delete-then-insert let two
        inserts collide, and a retry only moved the collision to a third writer)."""
        values = {"revision": revision, "replicas": replicas, "updated_at": ts}
        with self._tx() as conn:
            dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            statement = dialect_insert(service_scale).values(
                service=service, region=region, **values
            )
            conn.execute(
                statement.on_conflict_do_update(index_elements=["service", "region"], set_=values)
            )

    def clear_scale(self, service: str, region: str) -> None:
        with self._tx() as conn:
            conn.execute(
                delete(service_scale).where(
                    service_scale.c.service == service, service_scale.c.region == region
                )
            )


def doc_field(dialect: str, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
    """The text of top-level field ``key`` of the JSON document in ``column`` (stored as TEXT
    on both backends), in the dialect's own words: SQLite's ``json_extract``, PostgreSQL's
    ``CAST(... AS JSON) ->> key``."""
    if dialect == "postgresql":
        field: ColumnElement[Any] = cast(column, JSON)[key].as_string()
        return field
    return func.json_extract(column, f"$.{key}")


def glob_to_like(pattern: str) -> str:
    """A token scope (``*`` and ``?`` only, ``api/permissions.py``) as a LIKE pattern with
    ``\\`` as the escape, meaning the same on both backends (SQLite's GLOB is SQLite's alone).
    LIKE ignores ASCII case on SQLite; service names are lower-case DNS labels, so no name
    matches there that would not on PostgreSQL."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def in_progress(service: str, region: str, running_id: str | None) -> DeploymentInProgress:
    """The 409 for a change to a service a deployment is driving: names the deployment and the
    two commands that deal with it (follow it, or abort it)."""
    if running_id is None:
        return DeploymentInProgress(
            f"service {service} in region {region} already has a deployment in progress; "
            f"see `shipyard status {service}`",
            running_deployment_id=None,
        )
    return DeploymentInProgress(
        f"service {service} in region {region} already has deployment {running_id} in "
        f"progress: follow it with `shipyard status {running_id}`, or stop it with "
        f"`shipyard abort {running_id}` (traffic goes back to the stable revision)",
        running_deployment_id=running_id,
    )


def check_service_row(row: ServiceRow) -> None:
    """The service record's invariants (see ``Store.upsert_service``)."""
    if row.warm_revision is not None and row.warm_revision == row.serving_revision:
        raise InvariantViolation(
            f"service {row.service}@{row.region}: revision {row.serving_revision} cannot be both "
            "serving and warm (the janitor would retire the revision that serves)",
            service=row.service,
            revision=row.serving_revision,
        )
    if row.warm_revision is None and row.warm_until is not None:
        raise InvariantViolation(
            f"service {row.service}@{row.region}: a warm window without a warm revision",
            service=row.service,
        )


class AsyncStore:
    """``Store`` for the event loop: the same calls, each in a worker thread
    (``domain.clock.to_thread``, which a FakeClock waits for). Used by the orchestrator, the
    reconciler and the API routes; documents cross as JSON-ready dicts, serialised by the caller
    on the loop, so a thread never reads an object the loop is changing.

    A write, once issued, completes before its caller goes on, even when the caller is cancelled
    meanwhile (an abort, a shutdown): a thread cannot be stopped, and a write landing after the
    next control plane's writes would put back a state older than theirs.
    """

    def __init__(self, store: Store) -> None:
        self.sync = store

    async def _write(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        call = asyncio.ensure_future(to_thread(fn, *args, **kwargs))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait({call})
            if not call.cancelled():
                call.exception()  # retrieved: the caller is cancelled (a lost lease, say)
            raise

    async def create_deployment(
        self, doc: dict[str, Any], *, active: bool = True, lease: leases.LeaseClaim | None = None
    ) -> None:
        await self._write(self.sync.create_deployment, doc, active=active, lease=lease)

    async def save_deployment(self, doc: dict[str, Any], *, active: bool) -> None:
        await self._write(self.sync.save_deployment, doc, active=active)

    async def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        return await to_thread(self.sync.get_deployment, deployment_id)

    async def deployment_ids_with_prefix(
        self, prefix: str, limit: int = 100
    ) -> list[tuple[str, str]]:
        return await to_thread(self.sync.deployment_ids_with_prefix, prefix, limit)

    async def active_deployment(self, service: str, region: str) -> dict[str, Any] | None:
        return await to_thread(self.sync.active_deployment, service, region)

    async def active_deployments(self) -> list[dict[str, Any]]:
        return await to_thread(self.sync.active_deployments)

    async def count_deployments(self) -> dict[tuple[str, str], int]:
        return await to_thread(self.sync.count_deployments)

    async def deployment_statuses(self) -> list[tuple[str, str]]:
        return await to_thread(self.sync.deployment_statuses)

    async def get_deployments(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        return await to_thread(self.sync.get_deployments, ids)

    async def list_deployments(
        self, service: str | None = None, limit: int = 50, *, matching: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        return await to_thread(self.sync.list_deployments, service, limit, matching=matching)

    async def save_revision(
        self,
        revision: str,
        service: str,
        region: str,
        deployment_id: str,
        spec: dict[str, Any],
        ts: float,
    ) -> None:
        await self._write(
            self.sync.save_revision, revision, service, region, deployment_id, spec, ts
        )

    async def get_revision_spec(self, revision: str) -> dict[str, Any]:
        return await to_thread(self.sync.get_revision_spec, revision)

    async def has_directory_artifact(self, digest: str) -> bool:
        return await to_thread(self.sync.has_directory_artifact, digest)

    async def get_service(self, service: str, region: str) -> ServiceRow | None:
        return await to_thread(self.sync.get_service, service, region)

    async def list_services(self) -> list[ServiceRow]:
        return await to_thread(self.sync.list_services)

    async def upsert_service(self, service: str, region: str, **values: Any) -> ServiceRow:
        return await self._write(self.sync.upsert_service, service, region, **values)

    async def delete_service(self, service: str, region: str) -> None:
        await self._write(self.sync.delete_service, service, region)

    async def get_scale(self, service: str, region: str) -> ScaleRow | None:
        return await to_thread(self.sync.get_scale, service, region)

    async def set_scale(
        self, service: str, region: str, revision: str, replicas: int, ts: float
    ) -> None:
        await self._write(self.sync.set_scale, service, region, revision, replicas, ts)

    async def clear_scale(self, service: str, region: str) -> None:
        await self._write(self.sync.clear_scale, service, region)
