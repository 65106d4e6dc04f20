"""``/api/v1/services/{service}/secrets`` in process over the real pipeline on fakes: set, list
and remove need the right permission for that service, bad input is a clear 4xx, the value is
in no answer (nor in the audit trail), and a deployment shows the versions it runs with."""

from __future__ import annotations

import httpx
import pytest

from shipyard.domain.manifest import parse_manifest
from tests.api.test_api import Harness, body

VALUE = "s3cr3t-value-7c0ffee"
FIRST = "first-value-9d8e7f"
URL = "/api/v1/services/api/secrets"


async def put(
    client: httpx.AsyncClient, h: Harness, name: str, value: object, *perms: str
) -> httpx.Response:
    return await client.put(
        f"{URL}/{name}", json={"value": value}, headers=h.headers(*(perms or ("secret:write",)))
    )


async def test_set_list_remove(client: httpx.AsyncClient, h: Harness) -> None:
    first = await put(client, h, "DB_PASSWORD", FIRST)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["updated_by"] == "alice"
    second = await put(client, h, "DB_PASSWORD", VALUE)
    assert second.json()["version"] == 2
    assert (await put(client, h, "API_KEY", VALUE)).json()["version"] == 1
    listing = await client.get(URL, headers=h.headers("deployment:read"))
    assert listing.status_code == 200, listing.text
    assert [(s["name"], s["version"]) for s in listing.json()["secrets"]] == [
        ("API_KEY", 1),
        ("DB_PASSWORD", 2),
    ]
    gone = await client.delete(f"{URL}/API_KEY", headers=h.headers("secret:write"))
    assert gone.status_code == 200 and gone.json() == {
        "service": "api",
        "name": "API_KEY",
        "version": 1,
    }
    again = await client.delete(f"{URL}/API_KEY", headers=h.headers("secret:write"))
    assert again.status_code == 404 and "shipyard secret list api" in again.json()["detail"]
    after = await client.get(URL, headers=h.headers("deployment:read"))
    assert [s["name"] for s in after.json()["secrets"]] == ["DB_PASSWORD"]
    for r in (first, second, listing, gone, again, after):
        assert VALUE not in r.text and FIRST not in r.text
    audit = [(r.event_type, r.service, dict(r.detail)) for r in await h.audit.records()]
    assert [(e, s, d["name"], d["version"]) for e, s, d in audit] == [
        ("secret.set", "api", "DB_PASSWORD", 1),
        ("secret.set", "api", "DB_PASSWORD", 2),
        ("secret.set", "api", "API_KEY", 1),
        ("secret.removed", "api", "API_KEY", 1),
    ]
    assert all(d.get("token_id") for _, _, d in audit)
    assert VALUE not in repr(await h.audit.records())


async def test_writing_needs_secret_write_for_that_service(
    client: httpx.AsyncClient, h: Harness
) -> None:
    for perms in (("deployment:create", "deployment:read"), ("secret:write:other",)):
        r = await put(client, h, "DB_PASSWORD", VALUE, *perms)
        assert r.status_code == 403, (perms, r.text)
        d = await client.delete(f"{URL}/DB_PASSWORD", headers=h.headers(*perms))
        assert d.status_code == 403, (perms, d.text)
    assert (await put(client, h, "DB_PASSWORD", VALUE, "secret:write:a*")).status_code == 201
    # Listing is reading: deployment:read for the service; secret:write alone is not it.
    assert (await client.get(URL, headers=h.headers("secret:write"))).status_code == 403
    scoped = await client.get(URL, headers=h.headers("deployment:read:other"))
    assert scoped.status_code == 403
    assert (await client.get(URL)).status_code == 401
    assert len(await h.audit.records()) == 1


@pytest.mark.parametrize(
    ("name", "payload", "status"),
    [
        ("1BAD", {"value": VALUE}, 422),
        ("BAD-NAME", {"value": VALUE}, 422),
        ("DB_PASSWORD", {"value": ""}, 422),
        ("DB_PASSWORD", {"value": VALUE, "extra": 1}, 422),
        ("DB_PASSWORD", {"value": 42}, 422),
        ("DB_PASSWORD", {"value": VALUE + "\u0000"}, 422),
        ("DB_PASSWORD", {"value": VALUE * 1000}, 413),
    ],
    ids=["digit-first", "dash", "empty", "extra-field", "not-text", "nul", "too-big"],
)
async def test_bad_input_is_refused_without_echoing_the_value(
    client: httpx.AsyncClient, h: Harness, name: str, payload: dict[str, object], status: int
) -> None:
    r = await client.put(f"{URL}/{name}", json=payload, headers=h.headers("secret:write"))
    assert r.status_code == status, r.text
    assert VALUE not in r.text
    listing = await client.get(URL, headers=h.headers("deployment:read"))
    assert listing.json()["secrets"] == []


async def test_a_deployment_shows_the_versions_it_runs_with(
    client: httpx.AsyncClient, h: Harness
) -> None:
    h.builder.manifest = parse_manifest(
        '[service]\nname = "api"\n[run]\ncommand = "python3 app.py"\nsecrets = ["DB_PASSWORD"]\n'
    )
    await put(client, h, "DB_PASSWORD", "old")
    await put(client, h, "DB_PASSWORD", VALUE)
    r = await client.post("/api/v1/deploy", json=body(), headers=h.headers())
    assert r.status_code == 202, r.text
    deployment_id = r.json()["deployment_id"]
    await h.until(deployment_id, "Success")
    doc = await client.get(f"/api/v1/deployments/{deployment_id}", headers=h.headers())
    assert doc.json()["secrets"] == {"DB_PASSWORD": 2}
    assert h.runtime.specs[doc.json()["green_revision"]].secret_env == {"DB_PASSWORD": VALUE}
    service = await client.get("/api/v1/services/api", headers=h.headers())
    for answer in (doc, service):
        assert VALUE not in answer.text


async def test_a_deployment_without_secrets_shows_no_secrets_key(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.post("/api/v1/deploy", json=body(), headers=h.headers())
    await h.until(r.json()["deployment_id"], "Success")
    doc = await client.get(f"/api/v1/deployments/{r.json()['deployment_id']}", headers=h.headers())
    assert "secrets" not in doc.json()
