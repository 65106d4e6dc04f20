"""Leases, fencing, durable commands and active regions: what lets several control-plane
replicas share one database (issue 14).

Tables (migration ``0003_leases``):

- ``leases``: one row per thing exactly one replica may drive, ``deployment:<id>`` and
  ``janitor``: who holds it (``holder``, a replica id), its fencing ``token`` (bumped by every
  takeover, never reused), and until when (``expires_at``, a wall-clock reading of the holder's
  clock: the replicas' clocks must agree to well within a lease, which NTP gives).
- ``deployment_commands``: ``promote`` and ``abort`` requests, written by whichever replica
  received them and applied by the replica driving the deployment (``taken_at`` once applied).
- ``active_regions``: one row per region of every active deployment, written in the same
  transaction as the deployment and deleted in the one that makes it inactive; its primary key
  ``(service, region)`` is what makes one deployment per service hold across replicas, fleets
  included.

Fencing: the task driving a deployment sets ``Fence(name, token)`` in a context variable
(``fence``); every write transaction of the store (``store.db.Store._tx``) and of the audit log
calls ``check_fence`` first, which reads the lease row inside that transaction (PostgreSQL: ``FOR
SHARE``, so a takeover waits for the write and a write after the takeover sees the new token;
SQLite: under ``BEGIN IMMEDIATE``, the database's one writer lock) and raises ``LeaseLost`` when
the token moved on: nothing of that transaction is written.

``LeaseStore`` is synchronous (worker threads); ``AsyncLeaseStore`` is its event-loop face, used
by ``orchestrator/driving.py``, the pipeline and the API's ``driver`` field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from shipyard.domain.clock import to_thread
from shipyard.errors import LeaseLost

_P = ParamSpec("_P")
_T = TypeVar("_T")

metadata = MetaData()

leases = Table(
    "leases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

deployment_commands = Table(
    "deployment_commands",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", String(36), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("token_id", String(64)),
    Column("created_at", Float, nullable=False),
    Column("taken_at", Float),
    Column("taken_by", String(255)),
    Index("ix_deployment_commands_pending", "deployment_id", "taken_at"),
)

active_regions = Table(
    "active_regions",
    metadata,
    Column("service", String(63), primary_key=True),
    Column("region", String(63), primary_key=True),
    Column("deployment_id", String(36), nullable=False),
    Index("ix_active_regions_deployment", "deployment_id"),
)

#: The janitor's lease: the janitor, the reconciler and the checkpoint publisher run only on
#: the replica holding it.
JANITOR = "janitor"

CommandKind = Literal["promote", "abort"]


def deployment_lease(deployment_id: str) -> str:
    """The lease name of a deployment."""
    return f"deployment:{deployment_id}"


def replica_lease(replica_id: str) -> str:
    """The lease a running replica keeps on its own name: its presence (``Survey.others``)."""
    return f"replica:{replica_id}"


# --- fencing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """The lease a task writes under: ``name`` must still carry ``token`` when it writes.
    ``on_lost`` (called from the writing thread) tells the driver its lease moved on."""

    name: str
    token: int
    on_lost: Callable[[], None] | None = field(default=None, compare=False, repr=False)


_FENCE: ContextVar[Fence | None] = ContextVar("shipyard_fence", default=None)


def current_fence() -> Fence | None:
    return _FENCE.get()


def set_fence(fence: Fence | None) -> None:
    """Fence every write of the calling task from now on (the driving task sets it first thing;
    a task's context is its own, so nothing else is fenced by it)."""
    _FENCE.set(fence)


@contextlib.contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Fence the writes made inside the block (a command applied by the driver)."""
    reset = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(reset)


def check_fence(conn: Connection) -> None:
    """Inside a write transaction, before it writes: LeaseLost when the calling task writes
    under a fence whose token is no longer the lease's (see the module docstring)."""
    fence = _FENCE.get()
    if fence is None:
        return
    query = select(leases.c.token, leases.c.holder).where(leases.c.name == fence.name)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)  # FOR SHARE: a takeover waits for this write
    else:
        _begin_immediate(conn)
    row = conn.execute(query).first()
    if row is None or int(row.token) != fence.token:
        if fence.on_lost is not None:
            fence.on_lost()
        holder = f"{row.holder} holds it with token {row.token}" if row else "it no longer exists"
        raise LeaseLost(
            f"lease {fence.name} moved on ({holder}); this replica's token {fence.token} may "
            "not write any more: the new holder continues",
            lease=fence.name,
            token=fence.token,
        )


def _begin_immediate(conn: Connection) -> None:
    """SQLite: take the database's writer lock now, so the check and the writes after it are
    one atomic step (pysqlite otherwise begins lazily, at the first write)."""
    raw: Any = conn.connection.dbapi_connection
    if not getattr(raw, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def locked(conn: Connection) -> None:
    """Serialise a read-then-write transaction with every other writer (SQLite's writer lock;
    PostgreSQL rows are locked by the queries themselves)."""
    if conn.dialect.name == "sqlite":
        _begin_immediate(conn)


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRow:
    name: str
    holder: str
    token: int
    acquired_at: float
    renewed_at: float
    expires_at: float


@dataclass(frozen=True)
class LeaseClaim:
    """A new lease for ``holder`` (token 1), written with the deployment that needs it."""

    holder: str
    now: float
    seconds: float


@dataclass(frozen=True)
class Acquired:
    """A lease taken: its new token and who held it before (None: nobody)."""

    name: str
    token: int
    previous: str | None


@dataclass(frozen=True)
class Survey:
    """What the takeover loop sees: active deployments nobody drives, and the other replicas
    alive (holding an unexpired lease)."""

    orphans: list[str]
    others: set[str]


@dataclass(frozen=True)
class Command:
    id: int
    deployment_id: str
    kind: CommandKind
    actor: str
    token_id: str | None
    created_at: float


def _lease(row: Any) -> LeaseRow:
    return LeaseRow(
        name=row.name,
        holder=row.holder,
        token=int(row.token),
        acquired_at=float(row.acquired_at),
        renewed_at=float(row.renewed_at),
        expires_at=float(row.expires_at),
    )


# --- in the deployment's own transactions (store.db) ------------------------------------------


def insert_lease(conn: Connection, name: str, claim: LeaseClaim) -> None:
    conn.execute(
        insert(leases).values(
            name=name,
            holder=claim.holder,
            token=1,
            acquired_at=claim.now,
            renewed_at=claim.now,
            expires_at=claim.now + claim.seconds,
        )
    )


def regions_of(doc: Mapping[str, Any]) -> list[str]:
    """A stored deployment document's regions (``regions``, or its one ``region``)."""
    regions = doc.get("regions") or [doc["region"]]
    return [str(r) for r in regions]


def claim_regions(
    conn: Connection, deployment_id: str, service: str, regions: Sequence[str]
) -> None:
    """One ``active_regions`` row per region (IntegrityError: one is taken)."""
    conn.execute(
        insert(active_regions),
        [{"service": service, "region": r, "deployment_id": deployment_id} for r in regions],
    )


def release_regions(conn: Connection, deployment_id: str) -> None:
    conn.execute(delete(active_regions).where(active_regions.c.deployment_id == deployment_id))


def running_in(conn: Connection, service: str, regions: Iterable[str]) -> tuple[str, str] | None:
    """``(region, deployment_id)`` of the first of ``regions`` with a deployment in flight."""
    row = conn.execute(
        select(active_regions.c.region, active_regions.c.deployment_id)
        .where(active_regions.c.service == service, active_regions.c.region.in_(list(regions)))
        .order_by(active_regions.c.region)
        .limit(1)
    ).first()
    return (str(row[0]), str(row[1])) if row else None


def backfill_active_regions(conn: Connection) -> int:
    """Rows for active deployments written before ``active_regions`` existed (a database of an
    earlier release); returns how many were added. Idempotent."""
    have = {
        (r[0], r[1])
        for r in conn.execute(select(active_regions.c.service, active_regions.c.region))
    }
    added = 0
    for dep_id, service, region, doc in conn.execute(
        text("SELECT id, service, region, doc FROM deployments WHERE active ORDER BY created_at")
    ):
        try:
            regions = regions_of(json.loads(doc))
        except (ValueError, KeyError, TypeError):
            regions = [region]
        for r in regions:
            if (service, r) not in have:
                conn.execute(
                    insert(active_regions).values(service=service, region=r, deployment_id=dep_id)
                )
                have.add((service, r))
                added += 1
    return added


# --- the lease store -----------------------------------------------------------------------------


class LeaseStore:
    """Leases, commands and active regions over the store's engine (synchronous)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, name: str) -> LeaseRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(leases).where(leases.c.name == name)).first()
        return _lease(row) if row else None

    def get_many(self, names: Sequence[str]) -> dict[str, LeaseRow]:
        if not names:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(leases).where(leases.c.name.in_(list(names)))).all()
        return {r.name: _lease(r) for r in rows}

    def acquire(
        self, name: str, holder: str, now: float, seconds: float, *, steal_own: bool = False
    ) -> Acquired | None:
        """Take ``name`` if nobody holds it, its lease expired, or (``steal_own``: a replica
        starting again) it is held under ``holder``'s own id; the token goes up by one. None
        when someone else holds it."""
        with self.engine.begin() as conn:
            locked(conn)
            row = conn.execute(
                select(leases).where(leases.c.name == name).with_for_update()
            ).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        insert_lease(conn, name, LeaseClaim(holder, now, seconds))
                except IntegrityError:
                    return None  # another replica inserted it first
                return Acquired(name, 1, None)
            lease = _lease(row)
            if lease.expires_at > now and not (steal_own and lease.holder == holder):
                return None
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.token == lease.token)
                .values(
                    holder=holder,
                    token=lease.token + 1,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=now + seconds,
                )
            )
            return Acquired(name, lease.token + 1, lease.holder)

    def renew(self, holder: str, held: Mapping[str, int], now: float, seconds: float) -> set[str]:
        """Extend every lease in ``held`` (name -> token) to ``now + seconds``; returns the
        names whose token or holder moved on (lost)."""
        lost: set[str] = set()
        if not held:
            return lost
        with self.engine.begin() as conn:
            for name, token in sorted(held.items()):
                done = conn.execute(
                    update(leases)
                    .where(
                        leases.c.name == name, leases.c.token == token, leases.c.holder == holder
                    )
                    .values(renewed_at=now, expires_at=now + seconds)
                )
                if done.rowcount != 1:
                    lost.add(name)
        return lost

    def release(self, name: str, token: int, now: float) -> None:
        """Let the lease go (it expires now; the token stays, so it is never reused)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.token == token)
                .values(expires_at=now)
            )

    def survey(self, holder: str, now: float, *, own: bool) -> Survey:
        """Active deployments nobody drives (no lease, or an expired one; with ``own``, also
        those held under ``holder``'s id: a replica starting again), by id, and the other
        replicas alive."""
        with self.engine.connect() as conn:
            ids = [
                str(r[0])
                for r in conn.execute(
                    select(active_regions.c.deployment_id)
                    .distinct()
                    .order_by(active_regions.c.deployment_id)
                )
            ]
            others = {
                str(r[0])
                for r in conn.execute(
                    select(leases.c.holder)
                    .distinct()
                    .where(leases.c.expires_at > now, leases.c.holder != holder)
                )
            }
        current = self.get_many([deployment_lease(i) for i in ids])
        orphans = []
        for i in ids:
            lease = current.get(deployment_lease(i))
            if lease is None or lease.expires_at <= now or (own and lease.holder == holder):
                orphans.append(i)
        return Survey(orphans, others)

    def active_deployment_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            return {
                str(r[0]) for r in conn.execute(select(active_regions.c.deployment_id).distinct())
            }

    def service_active(self, service: str, region: str) -> bool:
        """Whether ``service`` has a deployment in flight in ``region`` (on any replica)."""
        with self.engine.connect() as conn:
            return running_in(conn, service, [region]) is not None

    # --- commands ----------------------------------------------------------------------------

    def add_command(
        self,
        deployment_id: str,
        kind: CommandKind,
        actor: str,
        token_id: str | None,
        now: float,
    ) -> int:
        with self.engine.begin() as conn:
            done = conn.execute(
                insert(deployment_commands).values(
                    deployment_id=deployment_id,
                    kind=kind,
                    actor=actor,
                    token_id=token_id,
                    created_at=now,
                )
            )
            key = done.inserted_primary_key
            return int(key[0]) if key else 0

    def pending(self, deployment_id: str | None = None) -> list[Command]:
        """Commands not applied yet (of ``deployment_id``, or of every active deployment), in
        the order they were given."""
        query = select(deployment_commands).where(deployment_commands.c.taken_at.is_(None))
        if deployment_id is not None:
            query = query.where(deployment_commands.c.deployment_id == deployment_id)
        else:
            query = query.where(
                deployment_commands.c.deployment_id.in_(
                    select(active_regions.c.deployment_id).scalar_subquery()
                )
            )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(deployment_commands.c.id)).all()
        return [
            Command(
                id=int(r.id),
                deployment_id=r.deployment_id,
                kind=r.kind,
                actor=r.actor,
                token_id=r.token_id,
                created_at=float(r.created_at),
            )
            for r in rows
        ]

    def mark_taken(self, command_ids: Sequence[int], holder: str, now: float) -> None:
        """The commands were applied (a fenced write: only the driver marks them)."""
        if not command_ids:
            return
        with self.engine.begin() as conn:
            check_fence(conn)
            conn.execute(
                update(deployment_commands)
                .where(
                    deployment_commands.c.id.in_(list(command_ids)),
                    deployment_commands.c.taken_at.is_(None),
                )
                .values(taken_at=now, taken_by=holder)
            )


class AsyncLeaseStore:
    """``LeaseStore`` for the event loop: each call in a worker thread (``to_thread``: the
    caller's context, so its fence, goes with it). A write, once issued, completes even when its
    caller is cancelled (as ``store.db.AsyncStore``)."""

    def __init__(self, store: LeaseStore) -> None:
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

    async def get(self, name: str) -> LeaseRow | None:
        return await to_thread(self.sync.get, name)

    async def get_many(self, names: Sequence[str]) -> dict[str, LeaseRow]:
        return await to_thread(self.sync.get_many, names)

    async def acquire(
        self, name: str, holder: str, now: float, seconds: float, *, steal_own: bool = False
    ) -> Acquired | None:
        return await self._write(self.sync.acquire, name, holder, now, seconds, steal_own=steal_own)

    async def renew(
        self, holder: str, held: Mapping[str, int], now: float, seconds: float
    ) -> set[str]:
        return await self._write(self.sync.renew, holder, dict(held), now, seconds)

    async def release(self, name: str, token: int, now: float) -> None:
        await self._write(self.sync.release, name, token, now)

    async def survey(self, holder: str, now: float, *, own: bool) -> Survey:
        return await to_thread(self.sync.survey, holder, now, own=own)

    async def service_active(self, service: str, region: str) -> bool:
        return await to_thread(self.sync.service_active, service, region)

    async def add_command(
        self,
        deployment_id: str,
        kind: CommandKind,
        actor: str,
        token_id: str | None,
        now: float,
    ) -> int:
        return await self._write(self.sync.add_command, deployment_id, kind, actor, token_id, now)

    async def pending(self, deployment_id: str | None = None) -> list[Command]:
        return await to_thread(self.sync.pending, deployment_id)

    async def mark_taken(self, command_ids: Sequence[int], holder: str, now: float) -> None:
        await self._write(self.sync.mark_taken, list(command_ids), holder, now)
