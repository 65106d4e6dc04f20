"""``PUT /api/v1/services/{name}/replicas`` (scale) and ``DELETE /api/v1/services/{name}``
in-process over the real pipeline on the fake runtime: health-gated, drained, refused while a
deployment is in flight, least-privilege permissions, audited, and the scaled count kept by the
reconciler until another revision serves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from shipyard.runtime.base import ReplicaStatus
from tests.api.test_api import Harness, body, canary_body


async def _deployed(client: httpx.AsyncClient, h: Harness, commit: str = "aaaa") -> str:
    r = await client.post("/api/v1/deploy?wait=true", json=body(commit), headers=h.headers())
    assert r.status_code == 200, r.text
    revision: str = r.json()["revision"]
    return revision


def _serving(h: Harness, revision: str) -> list[ReplicaStatus]:
    """The revision's replicas that take traffic."""
    state = h.runtime.services["api"]
    return [r for r in state.replicas.values() if r.revision == revision and r.alive and r.routable]


async def _scale(
    client: httpx.AsyncClient, h: Harness, n: int, *perms: str, service: str = "api"
) -> httpx.Response:
    return await client.put(
        f"/api/v1/services/{service}/replicas",
        json={"replicas": n},
        headers=h.headers(*(perms or ("service:scale",)), subject="ops"),
    )


async def _audited(h: Harness, event_type: str) -> list[dict[str, Any]]:
    return [r.to_dict() for r in await h.audit.records() if r.event_type == event_type]


# --- scale ---------------------------------------------------------------------------------------


async def test_scale_up_then_down_changes_the_serving_revision_only(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    deployments = h.store.list_deployments()

    up = await _scale(client, h, 3)
    assert up.status_code == 200, up.text
    assert up.json()["previous"] == 1 and up.json()["replicas"] == 3
    assert len(up.json()["started"]) == 2 and up.json()["stopped"] == []
    assert len(_serving(h, revision)) == 3
    for rid in up.json()["started"]:  # health-gated: probed before they took traffic
        assert h.prober.counts.get(rid, 0) >= 1

    down = await _scale(client, h, 1)
    assert down.status_code == 200, down.text
    assert len(down.json()["stopped"]) == 2
    assert set(down.json()["stopped"]) == set(up.json()["started"])  # the newest go first
    assert len(_serving(h, revision)) == 1
    assert h.runtime.services["api"].weights == {revision: 100}
    assert h.store.list_deployments() == deployments  # not a deployment
    scaled = await _audited(h, "service.scaled")
    assert [(a["detail"]["previous"], a["detail"]["replicas"]) for a in scaled] == [(1, 3), (3, 1)]
    assert all(a["user"] == "ops" and a["detail"]["token_id"] for a in scaled)
    row = h.store.get_scale("api", "local")
    assert row is not None and (row.revision, row.replicas) == (revision, 1)


async def test_a_new_replica_that_never_gets_healthy_is_stopped_and_nothing_changes(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    [original] = _serving(h, revision)
    h.prober.scripts[revision] = lambda r, _n: r.replica_id == original.replica_id

    r = await _scale(client, h, 2)

    assert r.status_code == 500, r.text
    assert r.json()["error"] == "revision_start_failed"
    assert "did not become healthy" in r.json()["detail"]
    assert "the service keeps its 1" in r.json()["detail"]
    assert [x.replica_id for x in _serving(h, revision)] == [original.replica_id]
    alive = [x for x in h.runtime.services["api"].replicas.values() if x.alive]
    assert [x.replica_id for x in alive] == [original.replica_id]
    assert h.store.get_scale("api", "local") is None
    assert await _audited(h, "service.scaled") == []


@pytest.mark.parametrize("n", [0, 65, -1])
async def test_a_count_outside_1_to_64_is_refused(
    client: httpx.AsyncClient, h: Harness, n: int
) -> None:
    revision = await _deployed(client, h)
    r = await _scale(client, h, n)
    assert r.status_code == 422
    assert "replicas" in r.json()["detail"]
    assert len(_serving(h, revision)) == 1


async def test_scale_needs_service_scale_for_that_service(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    for perms in (("deployment:create", "deployment:rollback"), ("service:scale:other",)):
        r = await _scale(client, h, 2, *perms)
        assert r.status_code == 403, (perms, r.text)
    assert (await _scale(client, h, 2, "service:scale:ap?")).status_code == 200
    assert len(_serving(h, revision)) == 2


async def test_scale_of_a_service_never_deployed_is_a_404(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await _scale(client, h, 2, service="nothere")
    assert r.status_code == 404
    assert "deploy it first" in r.json()["detail"]


async def test_scale_and_delete_are_refused_while_a_deployment_is_in_flight(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    paused = await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    running = paused.json()["deployment_id"]
    await h.until(running, "Paused")
    before = dict(h.runtime.services["api"].replicas)

    scaled = await _scale(client, h, 3)
    deleted = await client.delete(
        "/api/v1/services/api", headers=h.headers("service:delete", subject="ops")
    )

    for r in (scaled, deleted):
        assert r.status_code == 409, r.text
        assert f"`shipyard abort {running}`" in r.json()["detail"]
        assert r.json()["running_deployment_id"] == running
    assert dict(h.runtime.services["api"].replicas) == before
    assert len(_serving(h, revision)) == 1


async def _janitor_until(h: Harness, done: Callable[[], bool]) -> None:
    """Let the app's own janitor run passes (fake time moves while everything waits) until
    ``done``. A second pipeline reconciling beside it raced it for the same repair."""
    for _ in range(60):
        if done():
            return
        await h.clock.sleep(1)
    assert done(), "the janitor never repaired it"


async def test_the_reconciler_keeps_the_scaled_count_until_another_revision_serves(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    assert (await _scale(client, h, 3)).status_code == 200
    lost = _serving(h, revision)[0].replica_id
    h.runtime.crash(lost)  # dies, and no agent restarts it

    await _janitor_until(h, lambda: len(_serving(h, revision)) == 3)

    assert len(_serving(h, revision)) == 3
    drift = [a for a in await _audited(h, "data_plane.drift") if a["detail"]["drift"] == "replicas"]
    assert drift and drift[-1]["detail"]["expected"] == 3 and drift[-1]["detail"]["found"] == 2

    # The next deployment runs its manifest's count, and the old count is forgotten.
    newer = await _deployed(client, h, "bbbb")
    await _janitor_until(h, lambda: h.store.get_scale("api", "local") is None)
    assert len(_serving(h, newer)) == 1
    assert h.store.get_scale("api", "local") is None


# --- delete --------------------------------------------------------------------------------------


async def test_delete_stops_every_replica_removes_the_route_and_keeps_the_history(
    client: httpx.AsyncClient, h: Harness
) -> None:
    revision = await _deployed(client, h)
    deployments = h.store.list_deployments()

    r = await client.delete(
        "/api/v1/services/api", headers=h.headers("service:delete", subject="ops")
    )

    assert r.status_code == 200, r.text
    assert r.json()["revisions"] == [revision] and r.json()["replicas"] == 1
    assert "api" not in h.runtime.services
    assert h.store.get_service("api", "local") is None
    gone = await client.get("/api/v1/services/api", headers=h.headers())
    assert gone.status_code == 404
    assert h.store.list_deployments() == deployments
    [audited] = await _audited(h, "service.deleted")
    assert audited["user"] == "ops" and audited["detail"]["revisions"] == [revision]
    # Nothing brings it back: the reconciler has no serving revision to restore.
    context = await h.context(h.settings)
    await context.pipeline.reconcile_data_planes()
    assert "api" not in h.runtime.services


async def test_delete_needs_service_delete(client: httpx.AsyncClient, h: Harness) -> None:
    await _deployed(client, h)
    everything_else = ("deployment:create", "deployment:rollback", "service:scale")
    r = await client.delete("/api/v1/services/api", headers=h.headers(*everything_else))
    assert r.status_code == 403
    assert "api" in h.runtime.services


async def test_deleting_an_unknown_service_is_a_404(client: httpx.AsyncClient, h: Harness) -> None:
    r = await client.delete("/api/v1/services/nothere", headers=h.headers("service:delete"))
    assert r.status_code == 404
    assert "does not exist in region local" in r.json()["detail"]


async def test_a_405_lists_every_method_of_the_resource(
    client: httpx.AsyncClient, h: Harness
) -> None:
    """``GET`` and ``DELETE`` of a service are two routes; Allow names both (found by the
    schema fuzzer: Starlette named only the first route's)."""
    r = await client.request("OPTIONS", "/api/v1/services/api", headers=h.headers())
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET"
    replicas = await client.request("POST", "/api/v1/services/api/replicas", headers=h.headers())
    assert replicas.headers["allow"] == "PUT"
