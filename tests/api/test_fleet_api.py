"""A fleet deployment through the HTTP API in process: ``target.regions`` in the body, the result's
``regions`` and ``switch_skew_ms``, each region's state on the deployment resource, and
``GET /api/v1/services/{name}?region=R`` for each region's URL and serving revision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.api.app import create_app
from shipyard.api.context import AppContext
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.base import Runtime
from shipyard.runtime.fake import FakeRuntime
from shipyard.settings import Settings
from tests.api.test_api import Harness

REGIONS = ["eu", "us"]


class FleetHarness(Harness):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.settings = self.settings.model_copy(update={"regions": tuple(REGIONS)})
        self.fakes = {r: FakeRuntime(r, now=self.clock.now) for r in REGIONS}
        self.runtimes: dict[str, Runtime] = dict(self.fakes)

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
        return AppContext(settings, self.astore, self.audit, pipeline, self.tokens, self.runtimes)


@pytest.fixture
def fh(tmp_path: Path) -> FleetHarness:
    return FleetHarness(tmp_path)


@pytest.fixture
async def fleet_client(fh: FleetHarness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(fh.settings, context_factory=fh.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


def fleet_body(commit: str, regions: list[str] = REGIONS) -> dict[str, Any]:
    return {
        "source": {"repository": "/repo", "branch": "main", "commit": commit},
        "target": {"service_name": "api", "regions": regions},
        "strategy": {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}},
    }


async def test_fleet_deployment_through_the_api(
    fh: FleetHarness, fleet_client: httpx.AsyncClient
) -> None:
    headers = fh.headers()
    r = await fleet_client.post(
        "/api/v1/deploy?wait=true", json=fleet_body("aaaa1111"), headers=headers
    )
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["region"] == "eu"
    assert result["regions"] == {"eu": "switched", "us": "switched"}
    assert result["switch_skew_ms"] == 0.0  # the fake clock does not move during a switch
    revision = result["revision"]

    d = (
        await fleet_client.get(f"/api/v1/deployments/{result['deployment_id']}", headers=headers)
    ).json()
    assert d["regions"] == REGIONS
    assert {r: s["state"] for r, s in d["fleet"]["regions"].items()} == {
        "eu": "switched",
        "us": "switched",
    }
    assert d["fleet"]["regions"]["us"]["url"] == "http://us.fake/api"
    assert [s["weights"] for s in d["fleet"]["switches"]] == [{revision: 100}]

    for region in REGIONS:
        svc = await fleet_client.get(f"/api/v1/services/api?region={region}", headers=headers)
        assert svc.status_code == 200, svc.text
        assert svc.json()["url"] == f"http://{region}.fake/api"
        assert svc.json()["serving_revision"] == revision
        assert svc.json()["active_deployment"] is None


async def test_fleet_submit_refusals_are_problems(
    fh: FleetHarness, fleet_client: httpx.AsyncClient
) -> None:
    headers = fh.headers()
    r = await fleet_client.post(
        "/api/v1/deploy", json=fleet_body("aaaa1111", ["eu", "mars"]), headers=headers
    )
    assert r.status_code == 422
    assert r.json()["error"] == "unknown_region" and "mars" in r.json()["detail"]
    single = {**fleet_body("aaaa1111"), "target": {"service_name": "api", "region": "eu"}}
    r = await fleet_client.post("/api/v1/deploy?wait=true", json=single, headers=headers)
    assert r.status_code == 200, r.text
    r = await fleet_client.post("/api/v1/deploy", json=fleet_body("bbbb2222"), headers=headers)
    assert r.status_code == 409
    assert "serve different revisions" in r.json()["detail"]
    listing = (await fleet_client.get("/api/v1/deployments", headers=headers)).json()
    assert len(listing["deployments"]) == 1


async def test_single_region_result_has_no_fleet_fields(
    fh: FleetHarness, fleet_client: httpx.AsyncClient
) -> None:
    headers = fh.headers()
    single = {**fleet_body("aaaa1111"), "target": {"service_name": "api", "region": "us"}}
    r = await fleet_client.post("/api/v1/deploy?wait=true", json=single, headers=headers)
    assert r.status_code == 200, r.text
    assert "regions" not in r.json() and "switch_skew_ms" not in r.json()
    d = (
        await fleet_client.get(f"/api/v1/deployments/{r.json()['deployment_id']}", headers=headers)
    ).json()
    assert "regions" not in d and "fleet" not in d


async def test_the_schema_documents_the_fleet_fields(
    fh: FleetHarness, fleet_client: httpx.AsyncClient
) -> None:
    schema = (await fleet_client.get("/openapi.json", headers=fh.headers())).json()
    schemas = schema["components"]["schemas"]
    deployment = next(
        v
        for k, v in schemas.items()
        if k.startswith("Deployment") and "fleet" in v.get("properties", {})
    )
    assert {"regions", "fleet", "status", "stages"} <= set(deployment["properties"])
    result = next(v for k, v in schemas.items() if k.startswith("DeploymentResult"))
    assert {"switch_skew_ms", "regions", "revision"} <= set(result["properties"])
    regions = schemas["TargetEnvironment"]["properties"]["regions"]["anyOf"][0]
    assert regions["uniqueItems"] is True and regions["items"]["enum"] == REGIONS


async def test_the_schema_names_regions_joined_while_serving(
    fh: FleetHarness, fleet_client: httpx.AsyncClient
) -> None:
    def region_enums(schema: dict[str, Any]) -> tuple[list[str], list[str]]:
        target = schema["components"]["schemas"]["TargetEnvironment"]["properties"]
        [items] = [o["items"] for o in target["regions"]["anyOf"] if o.get("type") == "array"]
        return target["region"]["enum"], items["enum"]

    async def schema() -> dict[str, Any]:
        r = await fleet_client.get("/openapi.json", headers=fh.headers())
        assert r.status_code == 200
        doc: dict[str, Any] = r.json()
        return doc

    assert region_enums(await schema()) == (["eu", "us"], ["eu", "us"])
    # A region joins (api/fleet_control.py adds its runtime to the one shared map) ...
    fh.runtimes["ap"] = FakeRuntime("ap", now=fh.clock.now)
    assert region_enums(await schema()) == (["ap", "eu", "us"], ["ap", "eu", "us"])
    # ... and a deployment there is one the schema calls valid, and the server accepts.
    r = await fleet_client.post(
        "/api/v1/deploy?wait=true", json=fleet_body("bbbb2222", ["ap", "eu"]), headers=fh.headers()
    )
    assert r.status_code == 200, r.text
    del fh.runtimes["ap"]  # removed
    assert region_enums(await schema()) == (["eu", "us"], ["eu", "us"])
