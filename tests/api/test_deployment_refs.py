"""Deployment ids by prefix on every deployment route (``domain/deployment_ids.py``): a unique
prefix names its deployment, an ambiguous one is a 422 listing the candidates the token may read,
an unknown one a 404 that says so; and the 409 for a busy service names the commands to run."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from shipyard.domain import deployment_ids
from shipyard.errors import AmbiguousDeploymentId, NotFound
from tests.api.test_api import Harness, body, canary_body

# Two ids sharing their first 9 characters, and a third of another service sharing 4.
TWIN_A = "c0ffee00-1111-4111-8111-111111111111"
TWIN_B = "c0ffee00-2222-4222-8222-222222222222"
OTHER = "c0ff0000-3333-4333-8333-333333333333"


async def _deployed(
    client: httpx.AsyncClient, h: Harness, dep_id: str, commit: str, service: str = "api"
) -> dict[str, Any]:
    r = await client.post(
        "/api/v1/deploy?wait=true",
        json={**body(commit, service=service), "id": dep_id},
        headers=h.headers(),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_a_unique_prefix_names_its_deployment_on_every_read_route(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    for prefix in ("c0ff", "C0FFEE", TWIN_A[:20]):
        doc = await client.get(f"/api/v1/deployments/{prefix}", headers=h.headers())
        assert doc.status_code == 200, doc.text
        assert doc.json()["id"] == TWIN_A
    logs = await client.get("/api/v1/deployments/c0ffee/logs", headers=h.headers())
    assert logs.status_code == 200
    audit = await client.get("/api/v1/deployments/c0ffee/audit", headers=h.headers())
    assert audit.status_code == 200
    assert {r["deployment_id"] for r in audit.json()["records"]} == {TWIN_A}


async def test_an_ambiguous_prefix_lists_the_candidates_and_changes_nothing(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    await _deployed(client, h, TWIN_B, "bbbb")
    before = h.store.list_deployments()
    for method, path in [
        ("GET", "/api/v1/deployments/c0ffee00"),
        ("POST", "/api/v1/rollback/c0ffee00"),
        ("POST", "/api/v1/deployments/c0ffee00/abort"),
        ("POST", "/api/v1/deployments/c0ffee00/promote"),
    ]:
        r = await client.request(method, path, headers=h.headers())
        assert r.status_code == 422, (path, r.text)
        problem = r.json()
        assert problem["error"] == "ambiguous_deployment_id"
        assert problem["candidates"] == [TWIN_A, TWIN_B]
        assert TWIN_A in problem["detail"] and TWIN_B in problem["detail"]
        assert "give more characters" in problem["detail"]
    assert h.store.list_deployments() == before
    # One more character settles it: the rollback goes to the deployment it names.
    r = await client.post("/api/v1/rollback/c0ffee00-2?wait=true", headers=h.headers())
    assert r.status_code == 200, r.text
    assert h.store.get_deployment(TWIN_B)["status"] == "RolledBack"


async def test_an_ambiguity_lists_only_what_the_token_may_read(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    await _deployed(client, h, OTHER, "cccc", service="secret")
    r = await client.get(
        "/api/v1/deployments/c0ff", headers=h.headers("deployment:read:api", subject="bob")
    )
    assert r.status_code == 422
    assert r.json()["candidates"] == [TWIN_A]
    assert OTHER not in r.text
    assert "(and 1 more)" in r.json()["detail"]


async def test_an_unknown_prefix_is_a_404_saying_so(client: httpx.AsyncClient, h: Harness) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    r = await client.get("/api/v1/deployments/beef", headers=h.headers())
    assert r.status_code == 404
    assert "no deployment id starts with 'beef'" in r.json()["detail"]


@pytest.mark.parametrize("ref", ["c0f", "not-a-prefix", "c0ffee00-1111-4111-8111-1111111111112"])
async def test_a_short_or_malformed_reference_is_refused(
    client: httpx.AsyncClient, h: Harness, ref: str
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    r = await client.get(f"/api/v1/deployments/{ref}", headers=h.headers())
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"


async def test_promote_and_abort_by_prefix_act_on_the_full_id(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    paused = await client.post(
        "/api/v1/deploy", json={**canary_body("bbbb"), "id": TWIN_B}, headers=h.headers()
    )
    assert paused.status_code == 202
    await h.until(TWIN_B, "Paused")
    r = await client.post("/api/v1/deployments/c0ffee00-22/abort", headers=h.headers())
    assert r.status_code == 202, r.text
    assert r.json()["deployment_id"] == TWIN_B
    await h.until(TWIN_B, "RolledBack")


async def test_a_second_deployment_409_points_at_status_and_abort(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await _deployed(client, h, TWIN_A, "aaaa")
    running = await client.post(
        "/api/v1/deploy", json={**canary_body("bbbb"), "id": TWIN_B}, headers=h.headers()
    )
    assert running.status_code == 202
    r = await client.post("/api/v1/deploy", json=body("cccc"), headers=h.headers())
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert f"`shipyard abort {TWIN_B}`" in detail
    assert f"`shipyard status {TWIN_B}`" in detail
    assert r.json()["running_deployment_id"] == TWIN_B


# --- the pure rule ------------------------------------------------------------------------------


def test_choose_one_none_or_several() -> None:
    assert deployment_ids.choose("c0ff", [(TWIN_A, "api")]) == TWIN_A
    with pytest.raises(NotFound, match="no deployment id starts with 'c0ff'"):
        deployment_ids.choose("c0ff", [])
    with pytest.raises(AmbiguousDeploymentId) as caught:
        deployment_ids.choose("c0ff", [(TWIN_A, "api"), (OTHER, "secret")])
    assert caught.value.detail["candidates"] == [TWIN_A, OTHER]


def test_choose_hides_what_the_caller_may_not_read() -> None:
    with pytest.raises(AmbiguousDeploymentId) as caught:
        deployment_ids.choose(
            "c0ff", [(TWIN_A, "secret"), (OTHER, "secret")], visible=lambda s: s == "api"
        )
    assert caught.value.detail["candidates"] == []
    assert TWIN_A not in caught.value.message
    assert "none you may read (2 deployments)" in caught.value.message


@pytest.mark.parametrize("ref", ["abc", "", "zzzz", "abcd/", "a" * 37])
def test_normalise_refuses_what_cannot_be_an_id(ref: str) -> None:
    with pytest.raises(NotFound, match="at least its first 4 characters"):
        deployment_ids.normalise(ref)


def test_normalise_lowers_the_case() -> None:
    assert deployment_ids.normalise("C0FFEE") == "c0ffee"
