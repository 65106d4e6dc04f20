"""Tokens through the API: the registry (every token's id recorded, listed, revoked on every
server sharing the store at once), service-scoped permissions, and the four-eyes policy.

In process over the real pipeline on fakes (``test_api.Harness``); two harnesses over one data
directory are two control planes sharing one store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from shipyard.api.app import create_app
from shipyard.cli.token import token_app
from tests.api.test_api import ALL, Harness, body, canary_body

ADMIN = "token:admin"


@asynccontextmanager
async def serving(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(h.settings, context_factory=h.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
async def client(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(h) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def audit_of(h: Harness, event_type: str) -> list[dict[str, Any]]:
    return [r.to_dict() for r in await h.audit.records() if r.event_type == event_type]


# --- the registry --------------------------------------------------------------------------------


async def test_issue_records_the_id_never_the_token_and_audits_it(h: Harness) -> None:
    issued = await h.tokens.issue("ci", ["deployment:read"], 600, issued_by="local:ops")

    row = h.tokens.store.get(issued.claims.token_id)
    assert row is not None
    assert (row.subject, row.permissions, row.issued_by, row.revoked) == (
        "ci",
        ("deployment:read",),
        "local:ops",
        False,
    )
    assert row.expires_at - row.issued_at == 600
    assert jwt.decode(issued.token, options={"verify_signature": False})["jti"] == row.id
    with h.store.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM tokens")).all()
    assert issued.token not in repr(stored)
    assert issued.token.split(".")[2] not in repr(stored)  # not even the signature
    [created] = await audit_of(h, "token.created")
    assert created["user"] == "local:ops"
    assert created["detail"]["token_id"] == row.id
    assert created["detail"]["subject"] == "ci"


async def test_a_token_the_registry_never_recorded_gets_401(
    client: httpx.AsyncClient, h: Harness
) -> None:
    # Signed with the server's own key, as a stolen key would: not issued, not accepted.
    minted = h.tokens.authority.issue("mallory", ALL)

    r = await client.get("/api/v1/deployments", headers=bearer(minted))

    assert r.status_code == 401
    assert r.json()["reason"] == "unknown_token"
    assert "not in this server's token registry" in r.json()["detail"]


async def test_a_token_from_before_token_ids_gets_401_asking_for_a_new_one(
    client: httpx.AsyncClient,
) -> None:
    old = jwt.encode(
        {
            "sub": "ci",
            "iat": 1,
            "exp": 2**40,
            "iss": "shipyard",
            "permissions": ["deployment:read"],
        },
        b"k" * 32,
        algorithm="HS256",
    )

    r = await client.get("/api/v1/deployments", headers=bearer(old))

    assert r.status_code == 401
    assert r.json()["reason"] == "missing_token_id"
    assert "shipyard token create" in r.json()["detail"]


async def test_a_registry_row_that_says_otherwise_refuses_the_token(
    client: httpx.AsyncClient, h: Harness
) -> None:
    issued = h.issue("deployment:read")
    with h.store.engine.begin() as conn:  # someone narrows the record; the token still says more
        conn.execute(
            text("UPDATE tokens SET subject = 'someone-else' WHERE id = :id"),
            {"id": issued.claims.token_id},
        )

    r = await client.get("/api/v1/deployments", headers=bearer(issued.token))

    assert (r.status_code, r.json()["reason"]) == (401, "registry_mismatch")


async def test_revoking_on_one_server_refuses_the_token_on_another_at_once(
    tmp_path: Path,
) -> None:
    first, second = Harness(tmp_path), Harness(tmp_path)  # two control planes, one store
    ci = first.issue("deployment:read", subject="ci")
    admin = first.headers(ADMIN, subject="ops")
    async with serving(first) as one, serving(second) as two:
        for c in (one, two):
            assert (await c.get("/api/v1/deployments", headers=bearer(ci.token))).status_code == 200

        r = await two.delete(f"/api/v1/tokens/{ci.claims.token_id}", headers=admin)
        assert r.status_code == 200, r.text
        assert (r.json()["revoked_by"], r.json()["subject"]) == ("ops", "ci")

        for c in (one, two):
            refused = await c.get("/api/v1/deployments", headers=bearer(ci.token))
            assert refused.status_code == 401
            assert refused.json()["reason"] == "revoked"
            assert f"token {ci.claims.token_id} was revoked at " in refused.json()["detail"]
            assert "by ops" in refused.json()["detail"]
        again = await one.delete(f"/api/v1/tokens/{ci.claims.token_id}", headers=admin)
        assert again.json()["revoked_at"] == r.json()["revoked_at"]  # the first one stands
    [revoked] = await audit_of(second, "token.revoked")  # once, by the server that revoked it
    assert revoked["user"] == "ops"
    assert revoked["detail"]["token_id"] == ci.claims.token_id
    assert await audit_of(first, "token.revoked") == []


async def test_a_token_revoked_with_the_cli_is_refused_by_a_running_server(
    client: httpx.AsyncClient, h: Harness, tmp_path: Path
) -> None:
    ci = h.issue("deployment:read", subject="ci")
    assert (await client.get("/api/v1/services", headers=bearer(ci.token))).status_code == 200

    result = await asyncio.to_thread(
        CliRunner().invoke,
        token_app,
        ["revoke", ci.claims.token_id, "--data-dir", str(tmp_path)],
    )

    assert result.exit_code == 0, result.output
    assert f"revoked token {ci.claims.token_id} (ci)" in result.stdout
    r = await client.get("/api/v1/services", headers=bearer(ci.token))
    assert (r.status_code, r.json()["reason"]) == (401, "revoked")
    assert "by local:" in r.json()["detail"]


async def test_listing_tokens_needs_token_admin_and_shows_no_token(
    client: httpx.AsyncClient, h: Harness
) -> None:
    ci = h.issue("deployment:create:web-*", subject="ci")
    admin = h.issue(ADMIN, subject="ops")

    denied = await client.get("/api/v1/tokens", headers=bearer(ci.token))
    r = await client.get("/api/v1/tokens", headers=bearer(admin.token))

    assert denied.status_code == 403
    assert denied.json()["required_permission"] == ADMIN
    assert r.status_code == 200
    listed = {t["id"]: t for t in r.json()["tokens"]}
    assert listed[ci.claims.token_id]["permissions"] == ["deployment:create:web-*"]
    assert listed[ci.claims.token_id]["subject"] == "ci"
    assert listed[ci.claims.token_id]["revoked_at"] is None
    assert set(listed) == {ci.claims.token_id, admin.claims.token_id}
    assert ci.token not in r.text and admin.token not in r.text


async def test_revoking_an_unknown_id_is_404_and_a_bad_id_422(
    client: httpx.AsyncClient, h: Harness
) -> None:
    admin = h.headers(ADMIN, subject="ops")
    unknown = await client.delete("/api/v1/tokens/no-such-token-id-000", headers=admin)
    bad = await client.delete("/api/v1/tokens/not%20an%20id", headers=admin)
    assert unknown.status_code == 404
    assert "shipyard token list" in unknown.json()["detail"]
    assert bad.status_code == 422


async def test_deployment_actions_are_audited_with_the_token_id(
    client: httpx.AsyncClient, h: Harness
) -> None:
    ci = h.issue(subject="ci")
    r = await client.post("/api/v1/deploy?wait=true", json=body(), headers=bearer(ci.token))
    assert r.status_code == 200, r.text

    [requested] = await audit_of(h, "deployment.requested")
    assert requested["user"] == "ci"
    assert requested["detail"]["token_id"] == ci.claims.token_id


# --- permissions scoped to services --------------------------------------------------------------


@pytest.mark.parametrize(
    ("grant", "service", "allowed"),
    [
        pytest.param("deployment:create", "payments", True, id="unscoped-any-service"),
        pytest.param("deployment:create:payments", "payments", True, id="exact-name"),
        pytest.param("deployment:create:payments", "payments-v2", False, id="exact-not-prefix"),
        pytest.param("deployment:create:web-*", "web-api", True, id="glob-matches"),
        pytest.param("deployment:create:web-*", "payments", False, id="glob-does-not-match"),
        pytest.param("deployment:create:web-?", "web-a", True, id="single-char-glob"),
        pytest.param("deployment:create:*", "anything", True, id="star-is-every-service"),
    ],
)
async def test_deploy_checks_the_scope_against_the_target_service(
    client: httpx.AsyncClient, h: Harness, grant: str, service: str, allowed: bool
) -> None:
    ci = h.issue(grant, "deployment:read", subject="ci")

    r = await client.post(
        "/api/v1/deploy?wait=true", json=body(service=service), headers=bearer(ci.token)
    )

    if allowed:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 403
        scope = grant.split(":", 2)[2]
        assert r.json()["detail"] == (
            f"token for 'ci' may create and promote deployments only for services matching "
            f"'{scope}', not '{service}'"
        )
        assert r.json()["required_permission"] == f"deployment:create:{service}"
        assert h.store.list_deployments() == []  # nothing started


async def test_scoped_readers_see_only_their_services(
    client: httpx.AsyncClient, h: Harness
) -> None:
    web = (
        await client.post(
            "/api/v1/deploy?wait=true", json=body(service="web-api"), headers=h.headers()
        )
    ).json()
    pay = (
        await client.post(
            "/api/v1/deploy?wait=true", json=body(service="payments"), headers=h.headers()
        )
    ).json()
    reader = bearer(h.issue("deployment:read:web-*", subject="dash").token)

    listing = (await client.get("/api/v1/deployments", headers=reader)).json()["deployments"]
    services = (await client.get("/api/v1/services", headers=reader)).json()["services"]
    own = await client.get(f"/api/v1/deployments/{web['deployment_id']}", headers=reader)
    other = await client.get(f"/api/v1/deployments/{pay['deployment_id']}", headers=reader)
    other_log = await client.get(f"/api/v1/deployments/{pay['deployment_id']}/logs", headers=reader)
    other_audit = await client.get(
        f"/api/v1/deployments/{pay['deployment_id']}/audit", headers=reader
    )
    other_filter = await client.get("/api/v1/deployments?service=payments", headers=reader)
    other_service = await client.get("/api/v1/services/payments", headers=reader)
    metrics = await client.get("/metrics", headers=reader)

    assert [d["service"] for d in listing] == ["web-api"]
    assert [s["service"] for s in services] == ["web-api"]
    assert own.status_code == 200
    assert [
        r.status_code for r in (other, other_log, other_audit, other_filter, other_service, metrics)
    ] == [403] * 6
    assert "only for services matching 'web-*', not 'payments'" in other.json()["detail"]
    assert "for every service" in metrics.json()["detail"]
    everything = (await client.get("/api/v1/deployments", headers=h.headers())).json()
    assert {d["service"] for d in everything["deployments"]} == {"web-api", "payments"}


async def test_the_listing_limit_counts_only_what_the_token_may_read(
    client: httpx.AsyncClient, h: Harness
) -> None:
    for service in ("web-a", "payments", "payments", "payments"):
        await client.post(
            "/api/v1/deploy?wait=true", json=body(service=service), headers=h.headers()
        )
    reader = bearer(h.issue("deployment:read:web-?", subject="dash").token)

    r = await client.get("/api/v1/deployments?limit=1", headers=reader)

    assert [d["service"] for d in r.json()["deployments"]] == ["web-a"]


async def test_rollback_promote_and_abort_check_the_deployments_service(
    client: httpx.AsyncClient, h: Harness
) -> None:
    await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    await h.until(dep["deployment_id"], "Paused")
    other = bearer(
        h.issue("deployment:create:web-*", "deployment:rollback:web-*", subject="ci").token
    )
    url = f"/api/v1/deployments/{dep['deployment_id']}"

    promote = await client.post(f"{url}/promote", headers=other)
    abort = await client.post(f"{url}/abort", headers=other)
    rollback = await client.post(f"/api/v1/rollback/{dep['deployment_id']}", headers=other)

    assert [r.status_code for r in (promote, abort, rollback)] == [403, 403, 403]
    assert "not 'api'" in promote.json()["detail"]
    assert "roll back and abort deployments only" in abort.json()["detail"]
    assert h.store.get_deployment(dep["deployment_id"])["status"] == "Paused"  # untouched
    own = bearer(h.issue("deployment:create:api", subject="ci").token)
    assert (await client.post(f"{url}/promote", headers=own)).status_code == 202
    await h.until(dep["deployment_id"], "Success")


# --- four eyes -----------------------------------------------------------------------------------


async def test_four_eyes_refuses_the_deployer_and_lets_another_subject_promote(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.four_eyes = True
    async with serving(h) as client:
        await client.post(
            "/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers(subject="alice")
        )
        dep = (
            await client.post(
                "/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers(subject="alice")
            )
        ).json()
        await h.until(dep["deployment_id"], "Paused")
        url = f"/api/v1/deployments/{dep['deployment_id']}/promote"

        own = await client.post(url, headers=h.headers(subject="alice"))
        assert own.status_code == 403
        assert own.json()["detail"].startswith(
            f"'alice' deployed {dep['deployment_id']} and may not also promote it"
        )
        assert "--four-eyes" in own.json()["detail"]
        assert h.store.get_deployment(dep["deployment_id"])["status"] == "Paused"

        bob = h.issue("deployment:create", subject="bob")
        assert (await client.post(url, headers=bearer(bob.token))).status_code == 202
        await h.until(dep["deployment_id"], "Success")

    doc = h.store.get_deployment(dep["deployment_id"])
    assert doc["triggered_by"] == "alice"
    assert any(s["detail"].get("promoted_by") == "bob" for s in doc["stages"])
    [refused] = await audit_of(h, "deployment.promote_refused")
    assert (refused["user"], refused["detail"]["policy"]) == ("alice", "four_eyes")
    [requested] = await audit_of(h, "deployment.promote_requested")
    assert requested["user"] == "bob"
    assert requested["detail"]["token_id"] == bob.claims.token_id
    [promoted] = await audit_of(h, "deployment.promoted")
    assert promoted["detail"]["by"] == "bob"
