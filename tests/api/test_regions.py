"""The region API (api/regions.py) and the registry's join rules (api/fleet_control.py), in
process: tokens are one-time, expiring and hashed; removal refuses while a deployment is active
there and drops the region from the runtimes the pipeline uses. The real TLS paths are in
tests/security/test_pki.py and tests/fleet/."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy

from shipyard.api.app import create_app
from shipyard.api.context import AppContext
from shipyard.api.fleet_control import JoinRefused, RegionService
from shipyard.errors import InvalidInput
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.base import Runtime
from shipyard.runtime.fake import FakeRuntime
from shipyard.security import pki
from shipyard.settings import Settings
from tests.api.test_api import Harness


class FleetHarness(Harness):
    """The API harness with one runtimes dict shared by the pipeline and the API (as
    ``build_context`` has it) and a second fake region, ``eu``."""

    def __init__(self, tmp: Any) -> None:
        super().__init__(tmp)
        self.eu = FakeRuntime(now=self.clock.now)
        self.eu.router.rps = 50.0  # steady synthetic traffic, as the harness gives "local"
        self.runtimes: dict[str, Runtime] = {"local": self.runtime, "eu": self.eu}
        self.app_context: AppContext | None = None

    async def context(self, settings: Settings) -> AppContext:
        pipeline = Pipeline(
            store=self.astore,
            audit=self.audit,
            builder=self.builder,
            runtimes=self.runtimes,
            prober=self.prober,
            clock=self.clock,
            logs_dir=settings.data_dir / "deployments",
        )
        self.app_context = AppContext(
            settings, self.astore, self.audit, pipeline, self.tokens, self.runtimes
        )
        return self.app_context

    def service(self) -> RegionService:
        assert self.app_context is not None
        return self.app_context.region_service()


@pytest.fixture
def fh(tmp_path: Any) -> FleetHarness:
    return FleetHarness(tmp_path)


@pytest.fixture
async def api(fh: FleetHarness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(fh.settings, context_factory=fh.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


def _csr() -> str:
    return pki.make_csr(pki.new_key(), "ignored").decode()


async def test_add_list_and_remove_need_region_admin(
    api: httpx.AsyncClient, fh: FleetHarness
) -> None:
    reader = fh.headers("deployment:read")
    admin = fh.headers("region:admin", subject="ops")
    assert (
        await api.post("/api/v1/regions", json={"name": "eu"}, headers=reader)
    ).status_code == 403
    assert (await api.get("/api/v1/regions", headers=reader)).status_code == 403
    assert (await api.delete("/api/v1/regions/eu", headers=reader)).status_code == 403
    assert (await api.get("/api/v1/regions")).status_code == 401

    r = await api.post("/api/v1/regions", json={"name": "eu", "ttl_seconds": 600}, headers=admin)
    assert r.status_code == 201, r.text
    added = r.json()
    token = pki.JoinToken.parse(added["token"])
    assert token.fingerprint == added["ca_fingerprint"] == fh.service().pki.fingerprint()
    assert added["join_command"] is None  # no fleet listener has run in this data directory
    # Stored hashed: the secret appears nowhere in the database.
    with fh.store.engine.connect() as conn:
        dump = "\n".join(
            str(row) for row in conn.execute(sqlalchemy.text("SELECT * FROM join_tokens"))
        )
    assert token.secret not in dump and hashlib.sha256(token.secret.encode()).hexdigest() in dump

    listed = (await api.get("/api/v1/regions", headers=admin)).json()["regions"]
    assert [(r["name"], r["agent_url"], r["joined_at"]) for r in listed] == [("eu", None, None)]
    again = await api.post("/api/v1/regions", json={"name": "eu"}, headers=admin)
    assert again.status_code == 409 and "already registered" in again.json()["detail"]
    local = await api.post("/api/v1/regions", json={"name": "local"}, headers=admin)
    assert local.status_code == 409
    bad = await api.post("/api/v1/regions", json={"name": "Not_A_Label"}, headers=admin)
    assert bad.status_code == 422

    gone = await api.delete("/api/v1/regions/eu", headers=admin)
    assert gone.status_code == 200, gone.text
    assert "eu" not in fh.runtimes  # the pipeline's own dict: it no longer dials eu
    assert (await api.get("/api/v1/regions", headers=admin)).json()["regions"] == []
    assert (await api.delete("/api/v1/regions/eu", headers=admin)).status_code == 404
    events = [(e.event_type, e.user, e.region) for e in await fh.audit.records()]
    assert ("region.added", "ops", "eu") in events and ("region.removed", "ops", "eu") in events


@pytest.mark.parametrize(
    "where",
    [{"region": "eu"}, {"region": "local", "regions": ["local", "eu"]}],
    ids=["one-region", "fleet-deployment"],
)
async def test_removal_refused_while_a_deployment_is_active_there(
    api: httpx.AsyncClient, fh: FleetHarness, where: dict[str, Any]
) -> None:
    admin = fh.headers("region:admin")
    assert (
        await api.post("/api/v1/regions", json={"name": "eu"}, headers=admin)
    ).status_code == 201
    # An active deployment as the store holds it (a fleet one lists every region it runs in).
    doc = {"id": "d-active-1", "service": "api", "status": "Deploying", "created_ts": 1.0, **where}
    fh.store.create_deployment(doc, active=True)
    r = await api.delete("/api/v1/regions/eu", headers=admin)
    assert r.status_code == 409, r.text
    assert "d-active-1" in r.json()["detail"]
    assert "eu" in fh.runtimes
    listed = (await api.get("/api/v1/regions", headers=admin)).json()["regions"]
    assert [r["name"] for r in listed] == ["eu"]  # nothing changed
    fh.store.save_deployment({**doc, "status": "Success"}, active=False)
    assert (await api.delete("/api/v1/regions/eu", headers=admin)).status_code == 200


async def test_join_tokens_are_one_time_expiring_and_die_with_their_region(
    api: httpx.AsyncClient, fh: FleetHarness
) -> None:
    service = fh.service()
    now = [1000.0]
    service._clock = lambda: now[0]
    added = await service.add("eu", 60, by="ops")
    url = "https://127.0.0.1:1"  # nothing answers: the join does not wait for the agent

    with pytest.raises(InvalidInput):  # a bad CSR does not use the token
        await service.join(added.token, "not a csr", url)
    forged = pki.JoinToken.parse(added.token)
    forged = pki.JoinToken(forged.id, "x" * 43, forged.fingerprint)
    with pytest.raises(JoinRefused) as unknown:
        await service.join(forged.text, _csr(), url)
    assert unknown.value.detail["reason"] == "unknown"

    with pytest.raises(JoinRefused) as wrong:  # an agent started with another --region
        await service.join(added.token, _csr(), url, expect="us")
    assert wrong.value.detail["reason"] == "wrong_region"

    joined = await service.join(added.token, _csr(), url, expect="eu")  # still unused
    assert joined.region == "eu"
    cert = pki.load_certificate(joined.certificate.encode())
    assert pki.check_signature(cert, pki.load_certificate(joined.fleet_ca.encode()))
    row = (await service.list())[0]
    assert row.agent_url == url and row.cert_serial == pki.serial_hex(cert)
    assert fh.runtimes["eu"] is not fh.eu  # now the joined agent's mTLS runtime
    with pytest.raises(JoinRefused) as used:
        await service.join(added.token, _csr(), url)
    assert used.value.detail["reason"] == "used"

    late = await service.add("us", 60, by="ops")
    now[0] += 61
    with pytest.raises(JoinRefused) as expired:
        await service.join(late.token, _csr(), url)
    assert expired.value.detail["reason"] == "expired"
    assert (await service.list())[1].agent_url is None

    removed = await service.add("ap", 60, by="ops")
    await service.remove("ap", by="ops")
    with pytest.raises(JoinRefused) as dead:
        await service.join(removed.token, _csr(), url)
    assert dead.value.detail["reason"] == "unknown"  # its unused tokens went with it
    events = [e.event_type for e in await fh.audit.records()]
    assert events.count("region.joined") == 1


async def test_authorize_accepts_current_and_previous_certificates_only(
    api: httpx.AsyncClient, fh: FleetHarness
) -> None:
    from cryptography.hazmat.primitives import serialization

    service = fh.service()
    added = await service.add("eu", 60, by="ops")
    url = "https://127.0.0.1:1"
    first = pki.load_certificate(
        (await service.join(added.token, _csr(), url)).certificate.encode()
    )

    def der(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.DER))

    assert await service.authorize(der(first)) == ("eu", pki.serial_hex(first))
    second = pki.load_certificate(
        (await service.renew("eu", pki.serial_hex(first), _csr(), url)).encode()
    )
    third = pki.load_certificate(
        (await service.renew("eu", pki.serial_hex(second), _csr(), url)).encode()
    )
    assert (await service.authorize(der(third)))[0] == "eu"
    assert (await service.authorize(der(second)))[0] == "eu"  # the previous: until it expires
    with pytest.raises(JoinRefused) as stale:
        await service.authorize(der(first))
    assert stale.value.detail["reason"] == "not_current"
    with pytest.raises(JoinRefused):
        await service.authorize(None)
    await service.remove("eu", by="ops")
    with pytest.raises(JoinRefused) as removed:
        await service.authorize(der(third))
    assert removed.value.detail["reason"] == "region_removed"
