"""Writes ``tests/store/fixtures/release-0.db``: a store as the release before Alembic (issue 14)
left it, for ``test_migrations.py`` to upgrade and read.

It was run ONCE, at commit b7ccfd1 (before ``store/engine.py`` and the migrations existed), with
that commit's own code: ``make_engine`` + ``create_all``, ``TokenStore``, ``RegionStore`` and
``SqlAuditLog`` (its SQLite triggers). Later code would write a migrated database instead, so
the script refuses to run on it; keep the committed file. To write it again::

    git worktree add /tmp/release-0 b7ccfd1
    cp tests/store/make_release_fixture.py /tmp/release-0/tests/store/
    cd /tmp/release-0 && PYTHONPATH=src python -m tests.store.make_release_fixture
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import shutil
import sqlite3
import tempfile
from pathlib import Path

from shipyard.audit.chain import AuditEvent
from shipyard.audit.log import SqlAuditLog
from shipyard.store.db import Store
from shipyard.store.regions import JoinTokenRow, RegionStore
from shipyard.store.tokens import TokenRow, TokenStore

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.db"
DEPLOYMENT_ID = "0d5c1f9e-3c1b-4a51-9a8e-5b0c8f6d2e11"
REVISION = "rev-sha256-4f1c"
TS = 1_760_000_000.0


def _doc(status: str) -> dict[str, object]:
    return {
        "id": DEPLOYMENT_ID,
        "kind": "canary",
        "service": "web",
        "region": "local",
        "status": status,
        "created_ts": TS,
        "stages": [{"name": "build", "status": "Success"}],
    }


async def _audit(log: SqlAuditLog) -> None:
    for event_type, status in (
        ("deployment.created", "Pending"),
        ("deployment.stage_completed", "InProgress"),
        ("deployment.succeeded", "Success"),
    ):
        await log.append(
            AuditEvent(
                event_type=event_type,
                deployment_id=DEPLOYMENT_ID,
                service="web",
                region="local",
                user="alice",
                status=status,
                duration_ms=120,
                detail={"revision": REVISION},
            )
        )


def main() -> None:
    if importlib.util.find_spec("shipyard.store.engine") is not None:
        raise SystemExit("this code has the migrations: run the script at b7ccfd1 (docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        engine = importlib.import_module("shipyard.store.db").make_engine(data_dir)
        store = Store(engine)
        store.create_deployment(_doc("Pending"))
        store.save_revision(REVISION, "web", "local", DEPLOYMENT_ID, {"image": "web:1"}, TS)
        store.save_deployment(_doc("Success"), active=False)
        store.upsert_service("web", "local", serving_revision=REVISION, url="http://web.local")
        store.set_scale("web", "local", REVISION, 3, TS)
        tokens = TokenStore(engine)
        tokens.record(TokenRow("tok-1", "alice", ("deploy:web",), TS, TS + 86400, "admin"))
        tokens.set_max_ttl_seconds(90 * 86400)
        regions = RegionStore(engine)
        regions.add("eu-west", JoinTokenRow("jt-1", "ab" * 32, "eu-west", TS, TS + 3600), at=TS)
        clock = iter(TS + i for i in range(1, 100))
        log = SqlAuditLog(engine, data_dir / "audit.head", clock=lambda: next(clock))
        asyncio.run(_audit(log))
        engine.dispose()
        # One self-contained file: fold the WAL back in.
        conn = sqlite3.connect(data_dir / "shipyard.db")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.close()
        FIXTURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(data_dir / "shipyard.db", FIXTURE)
        print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
