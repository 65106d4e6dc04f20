"""``GET /api/v1/keys``: the signing public key with the key id its envelopes carry, behind the
weakest read permission like every route but /healthz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shipyard.api.app import create_app
from shipyard.api.context import AppContext
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.security import signing
from shipyard.security.gate import SecurityGate
from shipyard.settings import Settings
from tests.api.test_api import Harness


class GateHarness(Harness):
    """The API harness with a security gate on the test's data directory."""

    async def context(self, settings: Settings) -> AppContext:
        pipeline = Pipeline(
            store=self.astore,
            audit=self.audit,
            builder=self.builder,
            runtimes={"local": self.runtime},
            prober=self.prober,
            clock=self.clock,
            gate=SecurityGate(data_dir=settings.data_dir, db_path=None, clock=self.clock),
            attestations_dir=settings.data_dir / "attestations",
            logs_dir=settings.data_dir / "deployments",
        )
        return AppContext(
            settings, self.astore, self.audit, pipeline, self.tokens, {"local": self.runtime}
        )


async def _client(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(h.settings, context_factory=h.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


@pytest.fixture
def gh(tmp_path: Path) -> GateHarness:
    return GateHarness(tmp_path)


@pytest.fixture
async def client(gh: GateHarness) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(gh):
        yield c


async def test_keys_lists_the_signing_key_with_the_id_its_envelopes_carry(
    client: httpx.AsyncClient, gh: GateHarness, tmp_path: Path
) -> None:
    r = await client.get("/api/v1/keys", headers=gh.headers("deployment:read"))
    assert r.status_code == 200, r.text
    (key,) = r.json()["keys"]
    signer = signing.Ed25519Signer.load(tmp_path)  # the key the server made in its data dir
    pem_text = signer.public_key_pem()
    assert key["keytype"] == key["scheme"] == "ed25519"
    assert bytes.fromhex(key["keyval"]["public"]) == load_pem_public_key(
        pem_text.encode()
    ).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    envelope = signing.sign_statement(signer, {"_type": signing.STATEMENT_TYPE})
    assert envelope["signatures"][0]["keyid"] == key["keyid"]
    pem = await client.get("/api/v1/keys?format=pem", headers=gh.headers("deployment:read"))
    assert pem.status_code == 200
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    assert pem.text == pem_text


async def test_keys_needs_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/keys")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated"


async def test_keys_refuses_an_unknown_format(client: httpx.AsyncClient, gh: GateHarness) -> None:
    r = await client.get("/api/v1/keys?format=der", headers=gh.headers("deployment:read"))
    assert r.status_code == 422
    assert "format" in r.json()["detail"]


async def test_keys_without_a_gate_is_404(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    async for c in _client(h):
        r = await c.get("/api/v1/keys", headers=h.headers("deployment:read"))
        assert r.status_code == 404
        assert "signs no artifacts" in r.json()["detail"]
    assert not (tmp_path / "keys" / "signing.key").exists()
