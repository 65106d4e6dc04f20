"""The store: the service record's invariants, one active deployment per service (the partial
unique index), and ``AsyncStore`` keeping the event loop free while SQLite waits on a lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import DeploymentInProgress, InvariantViolation, NotFound
from shipyard.store.db import AsyncStore, Store, make_engine


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(make_engine(tmp_path))


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


async def test_the_event_loop_answers_while_sqlite_waits_on_a_lock(
    store: Store, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    await astore.create_deployment(deployment("a"))
    blocker = sqlite3.connect(tmp_path / "shipyard.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
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
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await write
    assert (await astore.get_deployment("a"))["status"] == "Building"


async def test_a_cancelled_write_still_lands_before_the_caller_moves_on(
    store: Store, tmp_path: Path
) -> None:
    astore = AsyncStore(store)
    await astore.create_deployment(deployment("a"))
    blocker = sqlite3.connect(tmp_path / "shipyard.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.ensure_future(
            astore.save_deployment(deployment("a", status="Baking"), active=True)
        )
        done, _ = await asyncio.wait({write}, timeout=0.3)
        assert not done  # in its thread, waiting on the lock
        write.cancel()
        done, _ = await asyncio.wait({write}, timeout=0.3)
        assert not done  # cancelled, but it waits for its write
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert store.get_deployment("a")["status"] == "Baking"
