"""Leases, fencing, durable commands and active regions (``store/leases.py``) on SQLite and on a
real PostgreSQL: a lease moves only once expired, a takeover bumps the token, a write under a
token that moved on is refused with nothing written, one deployment per service holds against
concurrent writers (fleets too), and a takeover waits for a fenced write in flight."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Engine, create_engine, inspect, select, text

from shipyard.audit import ANCHOR_FILENAME, AuditEvent, SqlAuditLog
from shipyard.errors import DeploymentInProgress, LeaseLost, NotFound
from shipyard.store import db, leases
from shipyard.store.engine import open_engine
from shipyard.store.leases import Fence, LeaseClaim, LeaseStore, fenced


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The store, migrated (0003_leases included), on SQLite or on a fresh PostgreSQL
    database."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    made = open_engine(url, tmp_path)
    yield made
    made.dispose()


def deployment(
    id: str, service: str = "api", regions: list[str] | None = None, status: str = "Pending"
) -> dict[str, Any]:
    regions = regions or ["local"]
    return {
        "id": id,
        "service": service,
        "region": regions[0],
        "regions": regions,
        "status": status,
        "created_ts": 1.0,
    }


NAME = leases.deployment_lease("d1")


def test_a_lease_moves_only_once_expired_and_each_takeover_bumps_the_token(
    engine: Engine,
) -> None:
    store = LeaseStore(engine)
    first = store.acquire(NAME, "a", now=100.0, seconds=10)
    assert first == leases.Acquired(NAME, 1, None)
    assert store.acquire(NAME, "b", now=109.0, seconds=10) is None  # still a's
    assert store.renew("a", {NAME: 1}, now=105.0, seconds=10) == set()  # now until 115
    assert store.acquire(NAME, "b", now=114.9, seconds=10) is None
    taken = store.acquire(NAME, "b", now=115.0, seconds=10)
    assert taken == leases.Acquired(NAME, 2, "a")
    assert store.renew("a", {NAME: 1}, now=116.0, seconds=10) == {NAME}  # a learns it lost
    row = store.get(NAME)
    assert row is not None and (row.holder, row.token, row.expires_at) == ("b", 2, 125.0)
    # A replica starting again under its own id takes its leases back at once (token 3).
    assert store.acquire(NAME, "b", now=117.0, seconds=10) is None
    again = store.acquire(NAME, "b", now=117.0, seconds=10, steal_own=True)
    assert again == leases.Acquired(NAME, 3, "b")
    # Released: it expires now, and the token is never reused.
    store.release(NAME, 3, now=118.0)
    assert store.acquire(NAME, "c", now=118.0, seconds=10) == leases.Acquired(NAME, 4, "b")


def test_a_write_under_a_lost_lease_is_refused_and_nothing_is_written(engine: Engine) -> None:
    store = db.Store(engine)
    store.create_deployment(deployment("d1"), lease=LeaseClaim("a", 100.0, 10))
    lost: list[str] = []
    fence_a = Fence(NAME, 1, on_lost=lambda: lost.append("a"))
    with fenced(fence_a):
        store.save_deployment({**deployment("d1"), "status": "Running"}, active=True)
    assert store.get_deployment("d1")["status"] == "Running"
    assert LeaseStore(engine).acquire(NAME, "b", now=111.0, seconds=10) is not None
    with fenced(fence_a), pytest.raises(LeaseLost, match="moved on"):
        store.save_deployment({**deployment("d1"), "status": "Success"}, active=False)
    with fenced(fence_a), pytest.raises(LeaseLost):
        store.upsert_service("api", "local", serving_revision="v2")
    assert lost == ["a", "a"]
    assert store.get_deployment("d1")["status"] == "Running"  # nothing written
    assert store.get_service("api", "local") is None
    assert LeaseStore(engine).service_active("api", "local")  # still in flight
    with fenced(Fence(NAME, 2)):  # the new driver writes
        store.save_deployment({**deployment("d1"), "status": "Success"}, active=False)
    assert not LeaseStore(engine).service_active("api", "local")


def test_one_deployment_per_service_across_regions_of_a_fleet(engine: Engine) -> None:
    store = db.Store(engine)
    store.create_deployment(deployment("f1", regions=["eu", "us"]))
    with pytest.raises(DeploymentInProgress) as exc:
        store.create_deployment(deployment("d2", regions=["us"]))  # a region of the fleet
    assert exc.value.detail["running_deployment_id"] == "f1"
    assert "region us" in exc.value.message
    with pytest.raises(DeploymentInProgress):
        store.create_deployment(deployment("f2", regions=["ap", "eu"]))
    store.create_deployment(deployment("d3", regions=["ap"]))  # free: fine
    assert store.get_deployment("d3")["id"] == "d3"
    with pytest.raises(NotFound):  # nothing of the refused one was written
        store.get_deployment("f2")
    store.save_deployment(deployment("f1", regions=["eu", "us"], status="Success"), active=False)
    store.create_deployment(deployment("d2", regions=["us"]))


def test_concurrent_creates_for_one_service_accept_exactly_one(engine: Engine) -> None:
    store = db.Store(engine)
    start = threading.Barrier(8)

    def create(i: int) -> str:
        regions = ["eu", "us"] if i % 2 else ["us"]  # fleets and single regions mixed
        start.wait()
        try:
            store.create_deployment(
                deployment(f"d{i}", regions=regions), lease=LeaseClaim(f"r{i}", 1.0, 10)
            )
        except DeploymentInProgress:
            return "409"
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(8)))
    assert answers.count("ok") == 1, answers
    winner = f"d{answers.index('ok')}"
    assert [d["id"] for d in store.active_deployments()] == [winner]
    lease = LeaseStore(engine).get(leases.deployment_lease(winner))
    assert lease is not None and lease.token == 1


def test_commands_wait_for_the_driver_and_only_the_driver_marks_them(engine: Engine) -> None:
    store, lease_store = db.Store(engine), LeaseStore(engine)
    store.create_deployment(deployment("d1"), lease=LeaseClaim("a", 100.0, 10))
    store.create_deployment(deployment("old", service="web"))
    store.save_deployment(deployment("old", service="web", status="Success"), active=False)
    first = lease_store.add_command("d1", "promote", "bob", "tok1", 101.0)
    second = lease_store.add_command("d1", "abort", "carol", None, 102.0)
    lease_store.add_command("old", "abort", "carol", None, 102.0)  # finished: never pending
    assert [(c.id, c.kind, c.actor) for c in lease_store.pending()] == [
        (first, "promote", "bob"),
        (second, "abort", "carol"),
    ]
    lease_store.acquire(NAME, "b", now=111.0, seconds=10)
    with fenced(Fence(NAME, 1)), pytest.raises(LeaseLost):
        lease_store.mark_taken([first], "a", 112.0)
    assert len(lease_store.pending("d1")) == 2
    with fenced(Fence(NAME, 2)):
        lease_store.mark_taken([first], "b", 112.0)
    assert [c.id for c in lease_store.pending("d1")] == [second]


def test_orphans_are_active_deployments_without_a_live_lease(engine: Engine) -> None:
    store, lease_store = db.Store(engine), LeaseStore(engine)
    store.create_deployment(deployment("d1"), lease=LeaseClaim("a", 100.0, 10))
    store.create_deployment(deployment("d2", service="web"))  # written before leases existed
    store.create_deployment(deployment("d3", service="db"), lease=LeaseClaim("b", 100.0, 10))
    assert lease_store.survey("a", now=105.0, own=False) == leases.Survey(["d2"], {"b"})
    assert lease_store.survey("a", now=105.0, own=True).orphans == ["d1", "d2"]
    assert lease_store.survey("c", now=110.0, own=False) == leases.Survey(["d1", "d2", "d3"], set())


def test_earlier_active_deployments_get_their_active_regions(tmp_path: Path) -> None:
    made = open_engine(None, tmp_path)
    store = db.Store(made)
    store.create_deployment(deployment("f1", regions=["eu", "us"]))
    with made.begin() as conn:  # as a database of the release before leases has it
        later = ("notification_outbox", "notification_sinks", "app_secrets")  # 0005, 0004
        for table in (*later, "active_regions", "deployment_commands", "leases"):
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002_audit_head'"))
    made.dispose()
    again = open_engine(None, tmp_path)  # migration 0003_leases fills active_regions
    assert LeaseStore(again).service_active("api", "us")
    with pytest.raises(DeploymentInProgress):
        db.Store(again).create_deployment(deployment("d2", regions=["eu"]))


def test_a_takeover_waits_for_a_fenced_write_in_flight(postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL: the write's ``FOR SHARE`` on the lease row makes the takeover wait until it
    commits; the next write under the old token is refused."""
    made = open_engine(postgres_url, tmp_path)
    store, lease_store = db.Store(made), LeaseStore(made)
    store.create_deployment(deployment("d1"), lease=LeaseClaim("a", 100.0, 10))
    with made.connect() as writing, ThreadPoolExecutor(1) as pool:
        tx = writing.begin()
        with fenced(Fence(NAME, 1)):
            leases.check_fence(writing)  # the write's transaction holds the lease row shared
        takeover = pool.submit(lease_store.acquire, NAME, "b", 111.0, 10)
        with made.connect() as watch:
            deadline = time.monotonic() + 60  # bounded, not timed: a loaded machine is slow
            while True:
                waiting = watch.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )
                ).scalar()
                # pg_stat_activity is read once per transaction and held until it ends: end it,
                # or a first look taken before the takeover queued is all this loop ever sees.
                watch.rollback()
                if waiting or takeover.done() or time.monotonic() > deadline:
                    break
                threading.Event().wait(0.01)
        assert waiting == 1 and not takeover.done(), "the takeover did not wait for the write"
        writing.execute(text("UPDATE deployments SET status = 'Running' WHERE id = 'd1'"))
        tx.commit()
        assert takeover.result(timeout=60) == leases.Acquired(NAME, 2, "a")
    assert store.get_deployment("d1") is not None
    with fenced(Fence(NAME, 1)), pytest.raises(LeaseLost):
        store.save_deployment(deployment("d1", status="Failed"), active=False)
    made.dispose()


async def test_the_audit_log_appends_nothing_under_a_lost_lease(tmp_path: Path) -> None:
    made = open_engine(None, tmp_path)
    db.Store(made).create_deployment(deployment("d1"), lease=LeaseClaim("a", 100.0, 10))
    log = SqlAuditLog(made, tmp_path / ANCHOR_FILENAME, fence=leases.check_fence)
    event = AuditEvent(event_type="deployment.step", deployment_id="d1", user="a")
    leases.set_fence(Fence(NAME, 1))  # this test's task drives d1
    await log.append(event)
    LeaseStore(made).acquire(NAME, "b", now=111.0, seconds=10)
    with pytest.raises(LeaseLost):
        await log.append(event)
    leases.set_fence(None)
    assert [r.seq for r in await log.records()] == [1]
    assert log.verify().ok
    await asyncio.sleep(0)
    made.dispose()


def _migration() -> Any:
    path = Path(leases.__file__).parent / "migrations" / "versions" / "0003_leases.py"
    spec = importlib.util.spec_from_file_location("shipyard_migration_0003_leases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0003_adds_the_tables_and_the_active_regions_of_deployments_in_flight(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Migration 0003 on a database without its tables (as 0002 leaves it): the three tables
    appear, a fleet in flight gets a row per region (a finished one none), and it goes back
    down cleanly."""
    if backend == "sqlite":
        made = create_engine(f"sqlite:///{tmp_path / 'shipyard.db'}")
    else:
        made = create_engine(request.getfixturevalue("postgres_url"))
    db.metadata.create_all(made)  # the baseline's deployments table, nothing of 0003
    store = db.Store(made)
    with made.begin() as conn:
        store_doc = deployment("f1", regions=["eu", "us"])
        conn.execute(
            db.deployments.insert().values(
                id="f1",
                service="api",
                region="eu",
                status="Baking",
                active=True,
                created_at=1.0,
                doc=json.dumps(store_doc),
            )
        )
        conn.execute(
            db.deployments.insert().values(
                id="old",
                service="web",
                region="eu",
                status="Success",
                active=False,
                created_at=0.5,
                doc=json.dumps(deployment("old", service="web", regions=["eu"])),
            )
        )
    migration = _migration()
    assert (migration.revision, migration.down_revision) == ("0003_leases", "0002_audit_head")
    with made.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        migration.upgrade()
    assert {"leases", "deployment_commands", "active_regions"} <= set(
        inspect(made).get_table_names()
    )
    with made.connect() as conn:
        rows = conn.execute(select(leases.active_regions).order_by("region")).all()
    assert [tuple(r) for r in rows] == [("api", "eu", "f1"), ("api", "us", "f1")]
    with pytest.raises(DeploymentInProgress):
        store.create_deployment(deployment("d2", regions=["us"]))
    with made.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        migration.downgrade()
    assert not {"leases", "deployment_commands", "active_regions"} & set(
        inspect(made).get_table_names()
    )
    made.dispose()


def test_migration_0003_over_tables_create_all_made_only_fills_active_regions(
    tmp_path: Path,
) -> None:
    made = create_engine(f"sqlite:///{tmp_path / 'shipyard.db'}")
    db.metadata.create_all(made)
    leases.metadata.create_all(made)  # as make_engine did before migrations ran
    db.Store(made).create_deployment(deployment("f1", regions=["eu", "us"]))
    with made.begin() as conn:
        conn.execute(text("DELETE FROM active_regions"))
    with made.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        _migration().upgrade()
    assert LeaseStore(made).service_active("api", "us")
    made.dispose()
