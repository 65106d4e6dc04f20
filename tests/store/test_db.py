"""The store, on SQLite and on PostgreSQL alike (the ``database`` fixture, tests/store/conftest.py):
the service record's invariants, one active deployment per service (the partial unique index),
the queries each backend words its own way (a JSON field, a scope glob), writers racing from two
replicas, and ``AsyncStore`` keeping the event loop free while the database holds a lock."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from shipyard.errors import DeploymentInProgress, InvariantViolation, NotFound
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine


@pytest.fixture
def store(database: str | None, tmp_path: Path) -> Iterator[Store]:
    engine = open_engine(database, tmp_path)
    yield Store(engine)
    engine.dispose()


@contextlib.contextmanager
def another_writer(store: Store, tmp_path: Path) -> Iterator[None]:
    """Another process holding the deployments table against writers (readers go on): SQLite's
    ``BEGIN IMMEDIATE`` on the file, PostgreSQL's ``LOCK TABLE ... IN EXCLUSIVE MODE``."""
    if store.engine.dialect.name == "sqlite":
        blocker = sqlite3.connect(tmp_path / "shipyard.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        return
    other = create_engine(store.engine.url)
    try:
        with other.connect() as conn:
            conn.execute(text("LOCK TABLE deployments IN EXCLUSIVE MODE"))
            try:
                yield
            finally:
                conn.commit()
    finally:
        other.dispose()


def deployment(id: str, service: str = "api", status: str = "Pending") -> dict[str, Any]:
    return {"id": id, "service": service, "region": "local", "status": status, "created_ts": 1.0}


def test_one_active_deployment_per_service(store: Store) -> None:
    store.create_deployment(deployment("a"))
    with pytest.raises(DeploymentInProgress) as exc:
        store.create_deployment(deployment("b"))
    assert exc.value.detail["running_deployment_id"] == "a"
    store.create_deployment(deployment("c", service="web"))  # another service: fine
    store.save_deployment(deployment("a", status="Success"), active=False)
    store.create_deployment(deployment("b"))  # the index covers active rows only
    assert sorted(d["id"] for d in store.active_deployments()) == ["b", "c"]


def test_documents_round_trip_and_unknown_ids_are_not_found(store: Store) -> None:
    doc = {**deployment("a"), "stages": [{"name": "build"}]}
    store.create_deployment(doc)
    assert store.get_deployment("a") == doc
    with pytest.raises(NotFound):
        store.get_deployment("nope")


def test_the_serving_revision_is_never_also_warm(store: Store) -> None:
    store.upsert_service("api", "local", serving_revision="v1")
    with pytest.raises(InvariantViolation, match="both serving and warm"):
        store.upsert_service("api", "local", warm_revision="v1", warm_until=5.0)
    with pytest.raises(InvariantViolation, match="warm window without a warm revision"):
        store.upsert_service("api", "local", warm_until=5.0)
    row = store.get_service("api", "local")
    assert row is not None and (row.warm_revision, row.warm_until) == (None, None)
    # Serving again a warm revision clears its warm mark in the same write.
    store.upsert_service("api", "local", warm_revision="v0", warm_until=5.0)
    row = store.upsert_service(
        "api", "local", serving_revision="v0", warm_revision=None, warm_until=None
    )
    assert (row.serving_revision, row.warm_revision) == ("v0", None)


async def test_async_store_calls_run_in_worker_threads(store: Store) -> None:
    threads: list[int] = []
    real = store.get_service

    def spy(service: str, region: str) -> Any:
        threads.append(threading.get_ident())
        return real(service, region)

    store.get_service = spy  # type: ignore[method-assign]
    await AsyncStore(store).get_service("api", "local")
    assert threads and threads[0] != threading.get_ident()


async def test_the_event_loop_answers_while_the_database_waits_on_a_lock(
    store: Store, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    await astore.create_deployment(deployment("a"))
    with another_writer(store, tmp_path):
        write = asyncio.ensure_future(
            astore.save_deployment(deployment("a", status="Building"), active=True)
        )
        # The write waits on SQLite's lock (busy_timeout, 5 s); the loop still runs other
        # work: a read is answered while the write is still waiting (no time bound of our own
        # beyond the busy timeout: how fast the read is depends on the machine's load).
        done, _ = await asyncio.wait({write}, timeout=0.3)
        assert not done
        assert await astore.get_deployment("a") == deployment("a")
        assert not write.done()  # answered while the writer still waited
    await write
    assert (await astore.get_deployment("a"))["status"] == "Building"


async def test_a_cancelled_write_still_lands_before_the_caller_moves_on(
    store: Store, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    await astore.create_deployment(deployment("a"))
    with another_writer(store, tmp_path):
        write = asyncio.ensure_future(
            astore.save_deployment(deployment("a", status="Baking"), active=True)
        )
        done, _ = await asyncio.wait({write}, timeout=0.3)
        assert not done  # in its thread, waiting on the lock
        write.cancel()
        done, _ = await asyncio.wait({write}, timeout=0.3)
        assert not done  # cancelled, but it waits for its write
    with pytest.raises(asyncio.CancelledError):
        await write
    assert store.get_deployment("a")["status"] == "Baking"


def test_deployments_are_counted_by_kind_and_status(store: Store) -> None:
    store.create_deployment({**deployment("a"), "kind": "canary"})
    store.save_deployment({**deployment("a", status="Success"), "kind": "canary"}, active=False)
    store.create_deployment({**deployment("b", service="web"), "kind": "canary"})
    store.create_deployment({**deployment("c", service="db"), "kind": "rolling"})
    assert store.count_deployments() == {
        ("canary", "Success"): 1,
        ("canary", "Pending"): 1,
        ("rolling", "Pending"): 1,
    }


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [
        (["web-*"], ["web-eu", "web-us"]),
        (["a?i"], ["api"]),
        (["api", "db"], ["api", "db"]),
        (["*"], ["api", "db", "web-eu", "web-us", "webxeu"]),
        (["web_eu"], []),  # LIKE's own wildcards are literal in a scope
        (["web%"], []),
        ([], []),
    ],
    ids=["star", "question-mark", "names", "everything", "underscore-literal", "percent", "none"],
)
def test_the_deployment_list_is_filtered_by_scope_globs_in_the_database(
    store: Store, scopes: list[str], expected: list[str]
) -> None:
    for n, name in enumerate(["api", "db", "web-eu", "web-us", "webxeu"]):
        store.create_deployment({**deployment(f"d{n}", service=name), "created_ts": float(n)})
    found = store.list_deployments(matching=scopes)
    assert sorted(d["service"] for d in found) == expected
    # The limit counts what the caller may see: the newest one it matches.
    if expected:
        assert [d["service"] for d in store.list_deployments(limit=1, matching=scopes)] == [
            expected[-1]
        ]


def test_ids_by_prefix_and_directory_artifacts(store: Store) -> None:
    for id in ("ab12-x", "ab34-y", "cd56-z"):
        store.create_deployment(deployment(id, service=f"s-{id[:2]}-{id[-1]}"))
    assert store.deployment_ids_with_prefix("ab") == [("ab12-x", "s-ab-x"), ("ab34-y", "s-ab-y")]
    assert store.deployment_ids_with_prefix("a_") == []  # LIKE's wildcard is escaped
    digest = "sha256:" + "e" * 64
    store.save_revision("r1", "api", "local", "ab12-x", {"artifact_digest": digest}, 1.0)
    store.save_revision(
        "r2",
        "api",
        "local",
        "ab12-x",
        {"artifact_digest": "sha256:" + "f" * 64, "artifact_kind": "image"},
        2.0,
    )
    assert store.has_directory_artifact(digest)
    assert not store.has_directory_artifact("sha256:" + "f" * 64)  # an image, not a directory
    assert not store.has_directory_artifact("sha256:" + "0" * 64)


def test_a_revision_is_recorded_once_even_by_racing_writers(store: Store) -> None:
    start = threading.Barrier(4, timeout=60)
    errors: list[BaseException] = []

    def record(n: int) -> None:
        start.wait()
        try:
            store.save_revision("r1", "api", "local", f"d{n}", {"n": n}, float(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get_revision_spec("r1") in [{"n": n} for n in range(4)]


def test_racing_service_and_scale_writers_leave_one_row_each(store: Store) -> None:
    start = threading.Barrier(4, timeout=60)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        start.wait()
        try:
            store.upsert_service("api", "local", url=f"http://api-{n}")
            store.set_scale("api", "local", "r1", n + 1, float(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.service for s in store.list_services()] == ["api"]
    scale = store.get_scale("api", "local")
    assert scale is not None and 1 <= scale.replicas <= 4
    store.delete_service("api", "local")
    assert store.get_service("api", "local") is None and store.get_scale("api", "local") is None
