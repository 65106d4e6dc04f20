"""Bearer tokens: issuing, every way a token must be refused, the key file, the FastAPI wiring."""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from shipyard.api.auth import (
    PERMISSIONS,
    Claims,
    TokenAuthority,
    bearer_token,
    require_permission,
)
from shipyard.api.tokens import TokenService, registry_row
from shipyard.errors import InvalidInput, PermissionDenied, Unauthenticated
from shipyard.store.engine import open_engine
from shipyard.store.tokens import TokenStore

NOW = 1_700_000_000


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(key: bytes, clock: Clock) -> TokenAuthority:
    return TokenAuthority(key, clock=clock)


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 3600,
        "iss": "shipyard",
        "jti": "hand-made-token-id-0001",
        "permissions": ["deployment:read"],
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def reason_of(authority: TokenAuthority, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)
    assert token == "" or token not in caught.value.message
    reason: str = caught.value.detail["reason"]
    return reason


# --- issuing and verifying -----------------------------------------------------------------------


def test_a_valid_token_gives_its_claims(authority: TokenAuthority) -> None:
    token = authority.issue("alice", ["deployment:read", "deployment:create"], ttl_seconds=600)

    claims = authority.verify(token)

    assert claims.subject == "alice"
    assert claims.permissions == {"deployment:read", "deployment:create"}
    assert claims.expires_at.timestamp() == NOW + 600
    assert claims.expires_at.utcoffset() is not None
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 600,
        "iss": "shipyard",
        "jti": claims.token_id,
        "permissions": ["deployment:create", "deployment:read"],
    }
    assert len(claims.token_id) == 32 and int(claims.token_id, 16) >= 0  # 16 random bytes, hex
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_the_default_lifetime_is_twelve_hours(authority: TokenAuthority) -> None:
    claims = authority.verify(authority.issue("alice", ["deployment:read"]))
    assert claims.expires_at.timestamp() == NOW + 12 * 3600


@pytest.mark.parametrize(
    ("subject", "permissions", "ttl"),
    [
        pytest.param("alice", ["deployment:delete"], 60, id="unknown-permission"),
        pytest.param("alice", ["deployment:read", "admin"], 60, id="one-unknown"),
        pytest.param("alice", [], 60, id="no-permissions"),
        pytest.param("alice", "deployment:read", 60, id="string-not-list"),
        pytest.param("", ["deployment:read"], 60, id="empty-subject"),
        pytest.param(" alice", ["deployment:read"], 60, id="padded-subject"),
        pytest.param("al\nice", ["deployment:read"], 60, id="control-char-subject"),
        pytest.param("a" * 201, ["deployment:read"], 60, id="long-subject"),
        pytest.param("alice", ["deployment:read"], 0, id="zero-ttl"),
        pytest.param("alice", ["deployment:read"], -5, id="negative-ttl"),
        pytest.param("alice", ["deployment:read"], True, id="bool-ttl"),
    ],
)
def test_issue_refuses_bad_input(
    authority: TokenAuthority, subject: str, permissions: list[str], ttl: int
) -> None:
    with pytest.raises(InvalidInput):
        authority.issue(subject, permissions, ttl_seconds=ttl)


def test_an_unknown_permission_error_lists_the_valid_ones(authority: TokenAuthority) -> None:
    with pytest.raises(InvalidInput) as caught:
        authority.issue("alice", ["deploy"])
    for permission in PERMISSIONS:
        assert permission in caught.value.message


def test_a_short_key_is_refused() -> None:
    with pytest.raises(InvalidInput):
        TokenAuthority(b"too short")


def test_the_key_never_shows_in_repr(key: bytes, authority: TokenAuthority) -> None:
    assert key.hex() not in repr(authority)
    assert repr(key) not in repr(authority)


# --- refusals ------------------------------------------------------------------------------------


def test_an_expired_token_is_refused(authority: TokenAuthority, clock: Clock) -> None:
    token = authority.issue("alice", ["deployment:read"], ttl_seconds=60)
    clock.now = NOW + 59
    assert authority.verify(token).subject == "alice"

    clock.now = NOW + 60

    assert reason_of(authority, token) == "expired"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        pytest.param("", "missing", id="empty"),
        pytest.param("garbage", "malformed", id="garbage"),
        pytest.param("a.b.c", "malformed", id="three-junk-segments"),
        pytest.param(b64url({"alg": "HS256"}) + ".%%%.", "malformed", id="bad-payload"),
        pytest.param(
            base64.urlsafe_b64encode(b"[1]").decode().rstrip("=") + ".e30.",
            "malformed",
            id="header-not-object",
        ),
    ],
)
def test_malformed_tokens_are_refused(authority: TokenAuthority, token: str, reason: str) -> None:
    assert reason_of(authority, token) == reason


def test_a_token_signed_with_another_key_is_refused(
    authority: TokenAuthority, clock: Clock
) -> None:
    forged = TokenAuthority(secrets.token_bytes(32), clock=clock).issue(
        "mallory", ["deployment:create"]
    )
    assert reason_of(authority, forged) == "invalid_signature"


def test_an_edited_payload_breaks_the_signature(authority: TokenAuthority) -> None:
    header, _, signature = authority.issue("alice", ["deployment:read"]).split(".")
    payload = b64url(claims_payload(permissions=sorted(PERMISSIONS)))

    assert reason_of(authority, f"{header}.{payload}.{signature}") == "invalid_signature"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"alg": "none"}, id="none"),
        pytest.param({"alg": "None", "typ": "JWT"}, id="None"),
        pytest.param({"alg": "NONE"}, id="NONE"),
        pytest.param({"typ": "JWT"}, id="no-alg"),
    ],
)
def test_an_unsigned_token_is_refused(authority: TokenAuthority, header: dict[str, str]) -> None:
    # Crafted by hand: header, payload, empty signature.
    token = f"{b64url(header)}.{b64url(claims_payload(permissions=sorted(PERMISSIONS)))}."
    assert reason_of(authority, token) == "unsupported_algorithm"


def test_an_hs512_token_is_refused_even_with_the_right_key(clock: Clock) -> None:
    key = secrets.token_bytes(64)  # long enough for HS512 itself
    authority = TokenAuthority(key, clock=clock)
    token = jwt.encode(claims_payload(), key, algorithm="HS512")
    assert reason_of(authority, token) == "unsupported_algorithm"


def test_an_rs256_token_is_refused(authority: TokenAuthority) -> None:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims_payload(), private_key, algorithm="RS256")
    assert reason_of(authority, token) == "unsupported_algorithm"


@pytest.mark.parametrize("claim", ["sub", "iat", "exp", "iss", "permissions"])
def test_a_token_missing_a_claim_is_refused(
    authority: TokenAuthority, key: bytes, claim: str
) -> None:
    token = jwt.encode(claims_payload(**{claim: None}), key, algorithm="HS256")
    assert reason_of(authority, token) == "missing_claim"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"permissions": "deployment:read"}, id="permissions-string"),
        pytest.param({"permissions": [1, 2]}, id="permissions-not-names"),
        pytest.param({"sub": ""}, id="empty-sub"),
        pytest.param({"sub": 7}, id="sub-not-text"),
        pytest.param({"exp": "tomorrow"}, id="exp-not-time"),
        pytest.param({"exp": True}, id="exp-bool"),
        pytest.param({"iat": "x"}, id="iat-not-time"),
    ],
)
def test_a_token_with_ill_typed_claims_is_refused(
    authority: TokenAuthority, key: bytes, overrides: dict[str, Any]
) -> None:
    token = jwt.encode(claims_payload(**overrides), key, algorithm="HS256")
    assert reason_of(authority, token) == "invalid_claim"


def test_a_token_from_another_issuer_is_refused(
    authority: TokenAuthority, key: bytes, clock: Clock
) -> None:
    other = TokenAuthority(key, issuer="someone-else", clock=clock)
    assert reason_of(authority, other.issue("alice", ["deployment:read"])) == "wrong_issuer"


def test_permissions_this_version_does_not_know_grant_nothing(
    authority: TokenAuthority, key: bytes
) -> None:
    token = jwt.encode(claims_payload(permissions=["deployment:read", "root"]), key, "HS256")
    assert authority.verify(token).permissions == {"deployment:read"}


# --- token ids and the lifetime limit ------------------------------------------------------------


def test_every_token_gets_its_own_random_id(authority: TokenAuthority) -> None:
    ids = {authority.mint("alice", ["deployment:read"]).claims.token_id for _ in range(50)}
    assert len(ids) == 50


def test_a_token_without_an_id_is_refused_with_a_message_to_reissue(
    authority: TokenAuthority, key: bytes
) -> None:
    token = jwt.encode(claims_payload(jti=None), key, algorithm="HS256")
    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)
    assert caught.value.detail["reason"] == "missing_token_id"
    assert "issue a new one with `shipyard token create`" in caught.value.message


@pytest.mark.parametrize("jti", [7, "short", "has spaces in the id!", "x" * 65])
def test_a_token_with_an_ill_formed_id_is_refused(
    authority: TokenAuthority, key: bytes, jti: object
) -> None:
    token = jwt.encode(claims_payload(jti=jti), key, algorithm="HS256")
    assert reason_of(authority, token) == "invalid_claim"


def test_the_default_maximum_lifetime_is_ninety_days(authority: TokenAuthority) -> None:
    ninety_days = 90 * 24 * 3600
    assert authority.verify(authority.issue("a", ["deployment:read"], ninety_days))
    with pytest.raises(InvalidInput) as caught:
        authority.issue("a", ["deployment:read"], ninety_days + 1)
    assert "maximum token lifetime, 7776000 s (90 days)" in caught.value.message
    assert "--max-token-ttl-days" in caught.value.message


def test_a_lifetime_over_the_limit_is_refused_at_issue(key: bytes, clock: Clock) -> None:
    authority = TokenAuthority(key, clock=clock, max_ttl_seconds=3600)
    with pytest.raises(InvalidInput) as caught:
        authority.issue("a", ["deployment:read"], 3601)
    assert caught.value.detail["max_ttl_seconds"] == 3600
    assert authority.verify(authority.issue("a", ["deployment:read"], 3600)).subject == "a"


def test_a_ten_year_token_signed_with_the_right_key_is_refused_at_verify(
    authority: TokenAuthority, key: bytes
) -> None:
    # What a stolen key mints: a valid signature, a lifetime no server of ours would issue.
    token = jwt.encode(claims_payload(exp=NOW + 10 * 365 * 86400), key, algorithm="HS256")

    with pytest.raises(Unauthenticated) as caught:
        authority.verify(token)

    assert caught.value.detail["reason"] == "lifetime_too_long"
    assert "longer than this server's maximum, 7776000 s (90 days)" in caught.value.message


def test_a_lower_limit_refuses_tokens_issued_under_a_higher_one(key: bytes, clock: Clock) -> None:
    token = TokenAuthority(key, clock=clock).issue("a", ["deployment:read"], 7200)
    assert reason_of(TokenAuthority(key, clock=clock, max_ttl_seconds=3600), token) == (
        "lifetime_too_long"
    )


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_a_bad_limit_is_refused(key: bytes, limit: Any) -> None:
    with pytest.raises(InvalidInput):
        TokenAuthority(key, max_ttl_seconds=limit)


def test_scoped_permissions_are_validated_at_issue(authority: TokenAuthority) -> None:
    with pytest.raises(InvalidInput, match="not a service name or a glob"):
        authority.issue("ci", ["deployment:create:Payments"])
    with pytest.raises(InvalidInput, match="cannot be narrowed"):
        authority.issue("ci", ["token:admin:web-*"])


def test_claims_answer_per_service(authority: TokenAuthority) -> None:
    claims = authority.verify(
        authority.issue("ci", ["deployment:create:web-*", "deployment:create:payments"])
    )

    assert claims.has_permission("deployment:create")
    assert claims.may("deployment:create", "web-api") and claims.may(
        "deployment:create", "payments"
    )
    assert not claims.may("deployment:create", "billing")
    assert not claims.everywhere("deployment:create")
    assert claims.scopes("deployment:create") == ["payments", "web-*"]
    claims.require("deployment:create", "web-api")
    with pytest.raises(PermissionDenied) as caught:
        claims.require("deployment:create", "billing")
    assert caught.value.message == (
        "token for 'ci' may create and promote deployments only for services matching "
        "'payments', 'web-*', not 'billing'"
    )
    with pytest.raises(PermissionDenied, match="for every service"):
        claims.require_everywhere("deployment:create")


# --- permissions and the header ------------------------------------------------------------------


def test_claims_permission_checks(authority: TokenAuthority) -> None:
    claims = authority.verify(authority.issue("bob", ["deployment:read"]))

    assert claims.has_permission("deployment:read")
    assert not claims.has_permission("deployment:create")
    claims.require("deployment:read")
    with pytest.raises(PermissionDenied) as caught:
        claims.require("deployment:rollback")
    assert caught.value.code == "insufficient_permissions"
    assert caught.value.detail["required_permission"] == "deployment:rollback"


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer  abc ", "abc"), ("BEARER x", "x")],
)
def test_bearer_token_reads_the_header(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("   ", "missing"),
        ("Bearer", "malformed_header"),
        ("Bearer ", "malformed_header"),
        ("Basic YWxpY2U6cHc=", "malformed_header"),
        ("Token abc", "malformed_header"),
        ("Bearer a b", "malformed_header"),
        ("abc.def.ghi", "malformed_header"),
    ],
)
def test_bearer_token_refuses_anything_else(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    assert caught.value.detail["reason"] == reason


# --- the key file --------------------------------------------------------------------------------


def test_the_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    first = TokenAuthority.from_data_dir(tmp_path)
    key_file = tmp_path / "keys" / "jwt.key"

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert [p.name for p in key_file.parent.iterdir()] == ["jwt.key"]  # no temp file left
    token = first.issue("alice", ["deployment:read"])
    assert TokenAuthority.from_data_dir(tmp_path).verify(token).subject == "alice"


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    TokenAuthority.from_data_dir(tmp_path)
    os.chmod(tmp_path / "keys" / "jwt.key", 0o644)

    with pytest.raises(InvalidInput, match="chmod 600"):
        TokenAuthority.from_data_dir(tmp_path)


def test_a_missing_data_dir_is_refused_not_created(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        TokenAuthority.from_data_dir(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


# --- FastAPI wiring, in process ------------------------------------------------------------------


@pytest.fixture
def service(authority: TokenAuthority, tmp_path: Path) -> Iterator[TokenService]:
    tokens = TokenService(authority, TokenStore(open_engine(None, tmp_path)), None)
    yield tokens
    tokens.close()


def recorded(service: TokenService, subject: str, permissions: list[str], ttl: int = 3600) -> str:
    """A token the registry knows (what ``TokenService.issue`` records), without a loop."""
    issued = service.authority.mint(subject, permissions, ttl)
    service.store.record(registry_row(issued, "test"))
    return issued.token


def make_app(service: TokenService) -> FastAPI:
    app = FastAPI()
    app.state.tokens = service

    @app.exception_handler(Unauthenticated)
    async def _401(_: Request, exc: Unauthenticated) -> JSONResponse:
        return JSONResponse({"error": exc.code, **exc.detail}, status_code=401)

    @app.exception_handler(PermissionDenied)
    async def _403(_: Request, exc: PermissionDenied) -> JSONResponse:
        return JSONResponse({"error": exc.code, **exc.detail}, status_code=403)

    @app.get("/deployments")
    async def list_deployments(
        claims: Annotated[Claims, Depends(require_permission("deployment:read"))],
    ) -> dict[str, str]:
        return {"subject": claims.subject}

    @app.post("/deployments")
    async def create_deployment(
        claims: Annotated[Claims, Depends(require_permission("deployment:create"))],
    ) -> dict[str, str]:
        return {"created_by": claims.subject}

    return app


@pytest.fixture
async def client(service: TokenService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
        yield c


async def test_a_permitted_token_reaches_the_route(
    client: httpx.AsyncClient, service: TokenService
) -> None:
    token = recorded(service, "alice", ["deployment:read", "deployment:create"])
    headers = {"Authorization": f"Bearer {token}"}

    assert (await client.get("/deployments", headers=headers)).json() == {"subject": "alice"}
    response = await client.post("/deployments", headers=headers)
    assert (response.status_code, response.json()) == (200, {"created_by": "alice"})


async def test_no_or_bad_credentials_get_401(
    client: httpx.AsyncClient, service: TokenService, clock: Clock
) -> None:
    no_header = await client.get("/deployments")
    garbage = await client.get("/deployments", headers={"Authorization": "Bearer garbage"})
    basic = await client.get("/deployments", headers={"Authorization": "Basic YTpi"})
    token = recorded(service, "alice", ["deployment:read"], ttl=10)
    clock.now += 10
    expired = await client.get("/deployments", headers={"Authorization": f"Bearer {token}"})

    assert [r.status_code for r in (no_header, garbage, basic, expired)] == [401] * 4
    assert [r.json()["reason"] for r in (no_header, garbage, basic, expired)] == [
        "missing",
        "malformed",
        "malformed_header",
        "expired",
    ]
    assert all(r.json()["error"] == "unauthenticated" for r in (no_header, expired))


async def test_a_token_without_the_permission_gets_403(
    client: httpx.AsyncClient, service: TokenService
) -> None:
    token = recorded(service, "viewer", ["deployment:read"])

    response = await client.post("/deployments", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 403
    assert response.json() == {
        "error": "insufficient_permissions",
        "required_permission": "deployment:create",
    }


def test_the_openapi_schema_declares_bearer_auth(service: TokenService) -> None:
    schema = make_app(service).openapi()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/deployments"]["get"]["security"] == [{"HTTPBearer": []}]


def test_an_unknown_permission_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown permission"):
        require_permission("deployment:destroy")
