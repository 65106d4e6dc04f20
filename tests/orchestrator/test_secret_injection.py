"""App secrets in deployments (fake runtime, real pipeline and SQLite store): pre-flight pins the
newest version of each secret the manifest names, the runtime gets exactly those versions'
values (environment or files), a secret not set fails the deployment before anything starts,
and a rollback to an older revision restores the values it ran with. Values never reach the
stored record, the audit trail or a spec's repr."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shipyard.build.fake import FakeBuilder
from shipyard.domain.manifest import parse_manifest
from tests.orchestrator.world import PipelineWorld

MANIFEST = """
[service]
name = "api"
[run]
command = "python3 app.py"
secrets = ["DB_PASSWORD"]
secret_files = { TLS_KEY = "tls.key" }
[health]
endpoint = "/health"
interval_seconds = 1
success_threshold = 2
failure_threshold = 3
"""

ONE, TWO, KEY = "pw-one-6f1d0c", "pw-two-83ab42", "-----KEY 91c2e7-----"


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, builder=FakeBuilder(manifest=parse_manifest(MANIFEST)))
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def stored_text(world: PipelineWorld) -> str:
    """Every deployment and revision row as stored."""
    with world.store.engine.connect() as conn:
        docs = [r[0] for r in conn.execute(text("SELECT doc FROM deployments"))]
        docs += [str(tuple(r)) for r in conn.execute(text("SELECT * FROM revisions"))]
    return "\n".join(docs)


async def test_the_runtime_gets_the_pinned_versions_values(world: PipelineWorld) -> None:
    await world.secrets.set("api", "DB_PASSWORD", "old", by="alice")
    await world.secrets.set("api", "DB_PASSWORD", ONE, by="alice")
    await world.secrets.set("api", "TLS_KEY", KEY, by="alice")
    done = await world.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
    assert done["status"] == "Success", done.get("error")
    assert done["secrets"] == {"DB_PASSWORD": 2, "TLS_KEY": 1}
    revision = done["green_revision"]
    spec = world.runtime.specs[revision]
    assert dict(spec.secret_env) == {"DB_PASSWORD": ONE}
    assert dict(spec.secret_files) == {"tls.key": KEY}
    assert "DB_PASSWORD" not in spec.env
    stored = await world.pipeline.records.revision(revision)
    assert (stored.secrets, stored.secret_files) == (
        {"DB_PASSWORD": 2, "TLS_KEY": 1},
        {"TLS_KEY": "tls.key"},
    )
    # Values nowhere but in what the runtime was handed.
    for value in (ONE, KEY):
        assert value not in repr(spec)
        assert value not in stored_text(world)
        assert value not in repr(await world.audit.records())
    assert '"DB_PASSWORD": 2' in stored_text(world)


async def test_a_secret_not_set_fails_before_anything_starts(world: PipelineWorld) -> None:
    await world.secrets.set("api", "TLS_KEY", KEY, by="alice")
    done = await world.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
    assert done["status"] == "Failed"
    assert done["error"]["code"] == "secret_missing"
    assert "shipyard secret set api DB_PASSWORD" in done["error"]["message"]
    assert world.runtime.started == [] and world.runtime.specs == {}
    assert [s["name"] for s in done["stages"]] == ["build"]


async def test_a_removed_secret_fails_the_next_deployment(world: PipelineWorld) -> None:
    await world.secrets.set("api", "DB_PASSWORD", ONE, by="alice")
    await world.secrets.set("api", "TLS_KEY", KEY, by="alice")
    first = await world.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
    assert first["status"] == "Success", first.get("error")
    await world.secrets.remove("api", "TLS_KEY", by="bob")
    second = await world.deploy("bbbb2222")
    assert second["status"] == "Failed" and second["error"]["code"] == "secret_missing"
    assert world.weights() == {first["green_revision"]: 100}  # the old one serves on


async def test_a_cold_rollback_restores_the_older_values(world: PipelineWorld) -> None:
    await world.secrets.set("api", "DB_PASSWORD", ONE, by="alice")
    await world.secrets.set("api", "TLS_KEY", KEY, by="alice")
    first = await world.deploy("aaaa1111", scale_down_delay_seconds=1)
    await world.secrets.set("api", "DB_PASSWORD", TWO, by="alice")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=1)
    assert second["secrets"] == {"DB_PASSWORD": 2, "TLS_KEY": 1}
    v1, v2 = first["green_revision"], second["green_revision"]
    assert world.runtime.specs[v2].secret_env == {"DB_PASSWORD": TWO}
    await world.clock.sleep(5)
    await world.pipeline.retire_expired()
    assert world.runtime.running_revisions("api") == {v2}  # v1 is gone: the rollback restarts it
    del world.runtime.specs[v1]
    rb = await world.wait((await world.rollback(second["id"], "bob"))["id"])
    assert rb["status"] == "Success", rb.get("error")
    assert rb["strategy"] == {"Rollback": {"instant": False}}
    assert world.weights() == {v1: 100}
    assert world.runtime.specs[v1].secret_env == {"DB_PASSWORD": ONE}
    assert world.runtime.specs[v1].secret_files == {"tls.key": KEY}


async def test_the_reconciler_restarts_with_the_deployed_versions(world: PipelineWorld) -> None:
    """A region that lost the service gets the serving revision back with the values it was
    deployed with, not the newest: a new value reaches replicas only by deploying."""
    await world.secrets.set("api", "DB_PASSWORD", ONE, by="alice")
    await world.secrets.set("api", "TLS_KEY", KEY, by="alice")
    first = await world.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
    v1 = first["green_revision"]
    await world.secrets.set("api", "DB_PASSWORD", TWO, by="alice")
    world.runtime.services["api"].replicas.clear()  # e.g. an agent that lost its state
    world.runtime.services["api"].weights = {}
    del world.runtime.specs[v1]
    await world.pipeline.reconcile_data_planes()
    assert world.weights() == {v1: 100}
    assert world.runtime.specs[v1].secret_env == {"DB_PASSWORD": ONE}


async def test_a_deployment_without_secrets_records_none(tmp_path: Path) -> None:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    try:
        done = await w.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
        assert done["status"] == "Success", done.get("error")
        spec = w.runtime.specs[done["green_revision"]]
        assert not spec.secret_env and not spec.secret_files
        assert "secret_env" not in spec.to_dict()  # what an agent from before secrets reads
    finally:
        await w.pipeline.stop()
