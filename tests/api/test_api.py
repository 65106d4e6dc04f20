"""The HTTP API in-process (httpx.ASGITransport) over the real pipeline on fakes.

Covers the ADR endpoints, auth (401/403 shapes), bad input (clear 4xx, nothing started) and the
``?wait=true`` answers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shipyard.api.auth import IssuedToken, TokenAuthority
from shipyard.api.context import AppContext
from shipyard.api.problems import ValidationProblem
from shipyard.api.tokens import TokenService, registry_row
from shipyard.audit import MemoryAuditLog
from shipyard.build.fake import FakeBuilder
from shipyard.domain.clock import FakeClock
from shipyard.health.fake import FakeProber
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.fake import FakeRuntime, TrafficProfile
from shipyard.settings import Settings
from shipyard.store.db import Store
from shipyard.store.engine import open_engine
from shipyard.store.tokens import TokenStore
from tests.orchestrator.world import ObservedStore

ALL = ["deployment:create", "deployment:read", "deployment:rollback"]


class Harness:
    def __init__(self, tmp: Path) -> None:
        # A followed log stream ends after 2 s of the fake clock (in-process clients read a
        # response to its end).
        self.settings = Settings(data_dir=tmp, max_body_bytes=4096, log_follow_max_seconds=2.0)
        self.clock = FakeClock()
        self.runtime = FakeRuntime(now=self.clock.now)
        self.runtime.router.rps = 50.0  # steady synthetic traffic, so canary analysis can measure
        self.builder = FakeBuilder()
        self.prober = FakeProber()
        #: What the tests read (synchronously); the app and its pipeline use ``astore``.
        self.store = Store(open_engine(None, tmp))
        self.astore = ObservedStore(self.store)
        self.audit = MemoryAuditLog(clock=self.clock.now)
        self.tokens = TokenService(
            TokenAuthority(b"k" * 32), TokenStore(self.store.engine), self.audit
        )
        #: Four eyes for the pipeline the next ``context`` builds.
        self.four_eyes = False

    async def context(self, settings: Settings) -> AppContext:
        pipeline = Pipeline(
            store=self.astore,
            audit=self.audit,
            builder=self.builder,
            runtimes={"local": self.runtime},
            prober=self.prober,
            clock=self.clock,
            logs_dir=settings.data_dir / "deployments",
            four_eyes=self.four_eyes,
        )
        return AppContext(
            settings, self.astore, self.audit, pipeline, self.tokens, {"local": self.runtime}
        )

    async def until(self, deployment_id: str, status: str) -> None:
        """Until the deployment's stored status is ``status`` (woken by every write of it)."""
        async with self.astore.changed:
            while (now := self.store.get_deployment(deployment_id)["status"]) != status:
                assert now not in ("Success", "Failed", "RolledBack"), f"ended {now}, not {status}"
                await self.astore.changed.wait()

    def issue(self, *perms: str, subject: str = "alice") -> IssuedToken:
        """A token recorded in the registry (as ``shipyard token create`` records it)."""
        issued = self.tokens.authority.mint(subject, list(perms or ALL))
        self.tokens.store.record(registry_row(issued, "test"))
        return issued

    def headers(self, *perms: str, subject: str = "alice") -> dict[str, str]:
        return {"authorization": f"Bearer {self.issue(*perms, subject=subject).token}"}


def body(commit: str = "abc123", service: str = "api", **strategy: Any) -> dict[str, Any]:
    return {
        "source": {"repository": "/repo", "branch": "main", "commit": commit},
        "target": {"service_name": service, "region": "local"},
        "strategy": {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0, **strategy}},
    }


async def test_healthz_needs_no_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_deploy_202_then_status_shows_stages_and_result(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.post("/api/v1/deploy", json=body(), headers=h.headers())
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status_url"].endswith(f"/api/v1/deployments/{accepted['deployment_id']}")
    assert r.headers["location"] == accepted["status_url"]
    await h.until(accepted["deployment_id"], "Success")
    doc = (
        await client.get(f"/api/v1/deployments/{accepted['deployment_id']}", headers=h.headers())
    ).json()
    assert doc["status"] == "Success"
    assert [s["name"] for s in doc["stages"]] == ["build", "start", "health_check", "switch"]
    assert all(s["duration_ms"] is not None for s in doc["stages"])
    assert doc["result"]["revision"] == doc["green_revision"]
    assert doc["metrics"]["validation"]["build_time_ok"] is True
    svc = (await client.get("/api/v1/services/api", headers=h.headers())).json()
    assert svc["serving_revision"] == doc["green_revision"]
    assert svc["weights"] == {doc["green_revision"]: 100}
    assert [r["ready"] for r in svc["replicas"]] == [True]
    listing = (await client.get("/api/v1/deployments?service=api", headers=h.headers())).json()
    assert [d["id"] for d in listing["deployments"]] == [doc["id"]]
    audit = (await client.get(f"/api/v1/deployments/{doc['id']}/audit", headers=h.headers())).json()
    assert audit["records"][0]["event_type"] == "deployment.requested"


async def test_wait_true_answers_with_the_final_result(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.post("/api/v1/deploy?wait=true", json=body(), headers=h.headers())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "Success"
    h.builder.fail.add("bad1")
    r = await client.post("/api/v1/deploy?wait=true", json=body("bad1"), headers=h.headers())
    assert r.status_code == 500
    assert r.json()["error"] == "deployment_failed"
    assert "build command exited" in r.json()["message"]


async def test_second_deployment_of_a_service_gets_409_naming_the_running_one(
    client: httpx.AsyncClient, h: Harness
) -> None:
    first = await client.post("/api/v1/deploy?wait=true", json=body(), headers=h.headers())
    assert first.status_code == 200
    # A second deployment has a stable revision, so it holds in its 600 s switch delay.
    running = await client.post(
        "/api/v1/deploy", json=body("def456", switch_delay_seconds=600), headers=h.headers()
    )
    assert running.status_code == 202
    running_id = running.json()["deployment_id"]
    r = await client.post("/api/v1/deploy", json=body("fed789"), headers=h.headers())
    assert r.status_code == 409
    assert r.json()["running_deployment_id"] == running_id
    assert running_id in r.json()["detail"]
    other = await client.post("/api/v1/deploy", json=body(service="other"), headers=h.headers())
    assert other.status_code == 202


async def test_rollback_endpoint(client: httpx.AsyncClient, h: Harness) -> None:
    one = (
        await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    ).json()
    two = (
        await client.post("/api/v1/deploy?wait=true", json=body("bbbb"), headers=h.headers())
    ).json()
    r = await client.post(
        f"/api/v1/rollback/{two['deployment_id']}?wait=true",
        headers=h.headers("deployment:rollback"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["revision"] == one["revision"]
    undone = (
        await client.get(f"/api/v1/deployments/{two['deployment_id']}", headers=h.headers())
    ).json()
    assert undone["status"] == "RolledBack" and undone["rollback_count"] == 1
    again = await client.post(f"/api/v1/rollback/{two['deployment_id']}", headers=h.headers())
    assert again.status_code == 409


# --- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer not.a.jwt",
        "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
        "eyJzdWIiOiJ4IiwicGVybWlzc2lvbnMiOlsiZGVwbG95bWVudDpjcmVhdGUiXX0.",
    ],
    ids=["missing", "basic", "empty-bearer", "garbage", "alg-none"],
)
async def test_bad_tokens_get_401(client: httpx.AsyncClient, header: str | None) -> None:
    headers = {"authorization": header} if header else {}
    r = await client.post("/api/v1/deploy", json=body(), headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "unauthenticated"


async def test_forged_and_expired_tokens_get_401(client: httpx.AsyncClient) -> None:
    forged = TokenAuthority(b"x" * 32).issue("mallory", ALL)
    r = await client.get("/api/v1/deployments", headers={"authorization": f"Bearer {forged}"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "needs"),
    [
        ("POST", "/api/v1/deploy", "deployment:create"),
        ("POST", "/api/v1/rollback/0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10", "deployment:rollback"),
        ("GET", "/api/v1/deployments", "deployment:read"),
        ("GET", "/api/v1/services/api", "deployment:read"),
    ],
)
async def test_missing_permission_gets_403(
    client: httpx.AsyncClient, h: Harness, method: str, path: str, needs: str
) -> None:
    others = [p for p in ALL if p != needs]
    r = await client.request(
        method, path, json=body() if method == "POST" else None, headers=h.headers(*others)
    )
    assert r.status_code == 403
    assert r.json()["error"] == "insufficient_permissions"


# --- bad input: clear 4xx and nothing started ----------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ("{not json", "(body)"),
        ({**body(), "strategy": {"Sideways": {}}}, "strategy"),
        (
            {**body(), "strategy": {"BlueGreen": {"switch_delay_seconds": -5}}},
            "strategy.BlueGreen.switch_delay_seconds",
        ),
        ({**body(), "target": {"service_name": "My_Service"}}, "target.service_name"),
        ({k: v for k, v in body().items() if k != "source"}, "source"),
        (
            {**body(), "source": {"repository": "/r", "branch": "main", "commit": 12345}},
            "source.commit",
        ),
        (
            {
                **body(),
                "source": {
                    "repository": "/r",
                    "branch": "main",
                    "commit": "abcd",
                    "dockerfile": "../x",
                },
            },
            "source.dockerfile",
        ),
    ],
    ids=[
        "malformed-json",
        "unknown-strategy",
        "negative",
        "not-dns-label",
        "missing-source",
        "mistyped-commit",
        "dockerfile-escape",
    ],
)
async def test_invalid_requests_get_422_naming_the_field(
    client: httpx.AsyncClient, h: Harness, payload: Any, field: str
) -> None:
    content = payload if isinstance(payload, str) else json.dumps(payload)
    r = await client.post(
        "/api/v1/deploy",
        content=content,
        headers={**h.headers(), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["error"] == "invalid_request"
    assert any(e["field"].startswith(field) for e in problem["errors"]), problem
    assert h.store.list_deployments() == []
    assert h.runtime.services == {}


async def test_unknown_region_and_unavailable_strategy_get_422(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.post(
        "/api/v1/deploy",
        json={**body(), "target": {"service_name": "api", "region": "mars"}},
        headers=h.headers(),
    )
    assert r.status_code == 422 and "mars" in r.json()["detail"]
    assert r.json()["error"] == "unknown_region"
    assert h.store.list_deployments() == []


async def test_oversized_body_gets_413(client: httpx.AsyncClient, h: Harness) -> None:
    big = {
        **body(),
        "metadata": {"description": "x" * 2000, "labels": {f"k{i}": "v" * 200 for i in range(20)}},
    }
    r = await client.post("/api/v1/deploy", json=big, headers=h.headers())
    assert r.status_code == 413
    assert r.json()["error"] == "body_too_large"
    assert h.store.list_deployments() == []


async def test_unknown_deployment_and_service_get_404(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.get(
        "/api/v1/deployments/0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10", headers=h.headers()
    )
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert (
        await client.get("/api/v1/deployments/not-a-uuid", headers=h.headers())
    ).status_code == 422
    assert (await client.get("/api/v1/services/nothere", headers=h.headers())).status_code == 404


# --- canary gates: promote / abort ------------------------------------------------------------


def canary_body(commit: str) -> dict[str, Any]:
    return {
        "source": {"repository": "/repo", "branch": "main", "commit": commit},
        "target": {"service_name": "api"},
        "strategy": {"Canary": {"stages": [{"weight": 20, "duration_seconds": 0, "pause": True}]}},
    }


async def _status(client: httpx.AsyncClient, h: Harness, dep_id: str, want: str) -> dict[str, Any]:
    await h.until(dep_id, want)
    doc: dict[str, Any] = (
        await client.get(f"/api/v1/deployments/{dep_id}", headers=h.headers())
    ).json()
    assert doc["status"] == want
    return doc


async def test_promote_releases_a_paused_canary(client: httpx.AsyncClient, h: Harness) -> None:
    await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    paused = await _status(client, h, dep["deployment_id"], "Paused")
    assert h.runtime.services["api"].weights[paused["green_revision"]] == 20
    url = f"/api/v1/deployments/{dep['deployment_id']}/promote"
    assert (await client.post(url, headers=h.headers("deployment:read"))).status_code == 403
    r = await client.post(url, headers=h.headers("deployment:create"))
    assert r.status_code == 202, r.text
    done = await _status(client, h, dep["deployment_id"], "Success")
    assert h.runtime.services["api"].weights == {done["green_revision"]: 100}
    again = await client.post(url, headers=h.headers())
    assert again.status_code == 409


async def test_abort_rolls_a_canary_back(client: httpx.AsyncClient, h: Harness) -> None:
    first = (
        await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    ).json()
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    await _status(client, h, dep["deployment_id"], "Paused")
    url = f"/api/v1/deployments/{dep['deployment_id']}/abort"
    assert (await client.post(url, headers=h.headers("deployment:create"))).status_code == 403
    r = await client.post(url, headers=h.headers("deployment:rollback", "deployment:read"))
    assert r.status_code == 202, r.text
    done = await _status(client, h, dep["deployment_id"], "RolledBack")
    assert done["error"]["type"] == "DeploymentAborted"
    assert h.runtime.services["api"].weights == {first["revision"]: 100}
    missing = "/api/v1/deployments/0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10/abort"
    assert (await client.post(missing, headers=h.headers())).status_code == 404


async def test_build_log_is_kept_and_served_incrementally(
    client: httpx.AsyncClient, h: Harness
) -> None:
    h.builder.fail.add("bad2")
    r = await client.post("/api/v1/deploy?wait=true", json=body("bad2"), headers=h.headers())
    dep_id = r.json()["deployment_id"]
    first = (await client.get(f"/api/v1/deployments/{dep_id}/logs", headers=h.headers())).json()
    assert "error: tests failed" in first["text"]
    assert first["building"] is False
    rest = await client.get(
        f"/api/v1/deployments/{dep_id}/logs?offset={first['offset']}", headers=h.headers()
    )
    assert rest.json()["text"] == ""
    doc = (await client.get(f"/api/v1/deployments/{dep_id}", headers=h.headers())).json()
    assert doc["stages"][0]["detail"]["log_tail"] == ["error: tests failed"]


async def test_metrics_expose_deployments_and_router_traffic(
    client: httpx.AsyncClient, h: Harness
) -> None:
    assert (await client.get("/metrics")).status_code == 401
    done = (await client.post("/api/v1/deploy?wait=true", json=body(), headers=h.headers())).json()
    await h.clock.sleep(10)  # 10 s of the fake router's synthetic traffic (50 req/s)
    r = await client.get("/metrics", headers=h.headers("deployment:read"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = exposition(r.text)
    assert samples[("shipyard_deployments", (("kind", "deploy"), ("status", "Success")))] == 1
    lab = (("region", "local"), ("revision", done["revision"]), ("service", "api"))
    assert samples[("shipyard_router_weight_ratio", lab)] == 1.0
    requests = samples[("shipyard_router_requests_total", lab)]
    assert requests >= 400
    buckets = [
        value
        for (name, labels), value in samples.items()
        if name == "shipyard_router_request_duration_seconds_bucket"
        and tuple(kv for kv in labels if kv[0] != "le") == lab
    ]
    assert len(buckets) == 14 and buckets == sorted(buckets) and buckets[-1] == requests
    assert samples[("shipyard_router_request_duration_seconds_count", lab)] == requests
    assert samples[("shipyard_scrape_errors", (("region", "local"),))] == 0


async def test_metrics_keep_every_digit_of_a_float(client: httpx.AsyncClient, h: Harness) -> None:
    done = (await client.post("/api/v1/deploy?wait=true", json=body(), headers=h.headers())).json()
    rev = done["revision"]
    h.runtime.router.profiles[rev] = TrafficProfile(latency_ms=1.2345678)
    await h.clock.sleep(10)

    async def latency_sum() -> float:
        router = await h.runtime.router.metrics("api")
        return float(router[rev]["latency_ms"]["sum"]) / 1000

    # Fake traffic keeps flowing while fake time moves (other sleepers: the janitor, the
    # checkpoint publisher), so take a scrape during which the sum did not change.
    for _ in range(20):
        exact = await latency_sum()
        r = await client.get("/metrics", headers=h.headers("deployment:read"))
        if await latency_sum() == exact:
            break
    else:
        raise AssertionError("the router's counters never held still across a scrape")
    assert f"{exact:g}" != repr(exact)  # more digits than %g keeps: the case that matters

    lab = (("region", "local"), ("revision", rev), ("service", "api"))
    assert exposition(r.text)[("shipyard_router_request_duration_seconds_sum", lab)] == exact


def exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus-client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_service_status_warns_when_nothing_can_answer(
    client: httpx.AsyncClient, h: Harness
) -> None:
    r = await client.post("/api/v1/deploy?wait=true", json=body("aaa111"), headers=h.headers())
    assert r.json()["status"] == "Success", r.text
    svc = (await client.get("/api/v1/services/api", headers=h.headers())).json()
    assert svc["warnings"] == []
    assert [r["restarts"] for r in svc["replicas"]] == [0]
    replicas = h.runtime.services["api"].replicas
    (rid,) = replicas
    replicas[rid] = dataclasses.replace(
        replicas[rid], state="crashed", routable=False, restarts=4, exit_code=137
    )
    svc = (await client.get("/api/v1/services/api", headers=h.headers())).json()
    assert svc["replicas"][0]["restarts"] == 4
    assert svc["warnings"][0].startswith("no routable replica: the service answers 503")
    assert f"replica {rid} is crashed after 4 restart(s), last exit code 137" in svc["warnings"]


# --- found by tests/api/test_fuzz.py (schemathesis) ----------------------------------------------


@pytest.mark.parametrize("offset", [2**44, 2**63, 2**64 + 5], ids=["2^44", "2^63", "past-int64"])
async def test_a_log_offset_past_the_end_answers_the_end_not_500(
    client: httpx.AsyncClient, h: Harness, offset: int
) -> None:
    h.builder.fail.add("bad3")
    r = await client.post("/api/v1/deploy?wait=true", json=body("bad3"), headers=h.headers())
    dep_id = r.json()["deployment_id"]
    whole = (await client.get(f"/api/v1/deployments/{dep_id}/logs", headers=h.headers())).json()
    assert whole["text"]
    r = await client.get(f"/api/v1/deployments/{dep_id}/logs?offset={offset}", headers=h.headers())
    assert r.status_code == 200, r.text
    assert r.json() == {"offset": whole["offset"], "text": "", "building": False}


async def test_abort_with_wait_answers_200_with_the_rolled_back_deployment(
    client: httpx.AsyncClient, h: Harness
) -> None:
    first = (
        await client.post("/api/v1/deploy?wait=true", json=body("aaaa"), headers=h.headers())
    ).json()
    dep = (
        await client.post("/api/v1/deploy", json=canary_body("bbbb"), headers=h.headers())
    ).json()
    await _status(client, h, dep["deployment_id"], "Paused")
    r = await client.post(
        f"/api/v1/deployments/{dep['deployment_id']}/abort?wait=true", headers=h.headers()
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == dep["deployment_id"] and doc["status"] == "RolledBack"
    assert doc["error"]["type"] == "DeploymentAborted"
    assert h.runtime.services["api"].weights == {first["revision"]: 100}


async def test_405_names_the_allowed_methods(client: httpx.AsyncClient) -> None:
    r = await client.put("/healthz")
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["allow"] == "GET"


async def test_the_422_body_is_the_declared_validation_problem(
    client: httpx.AsyncClient, h: Harness
) -> None:
    app_schema = (await client.get("/openapi.json")).json()
    declared = app_schema["paths"]["/api/v1/deploy"]["post"]["responses"]["422"]["content"]
    assert list(declared) == ["application/problem+json"]
    assert declared["application/problem+json"]["schema"]["$ref"].endswith("/ValidationProblem")
    r = await client.post("/api/v1/deploy", json={"source": {}}, headers=h.headers())
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    problem = ValidationProblem.model_validate(r.json())
    assert problem.error == "invalid_request" and problem.errors
    assert {e.field for e in problem.errors} >= {"source.repository", "target", "strategy"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("branch", "-x"),
        ("branch", "a..b"),
        ("branch", "a\tb"),
        ("commit", "xyz!"),
        ("dockerfile", ""),
        ("dockerfile", "../Dockerfile"),
    ],
)
async def test_source_fields_the_schema_refuses_are_refused(
    client: httpx.AsyncClient, h: Harness, field: str, value: str
) -> None:
    doc = body()
    doc["source"][field] = value
    r = await client.post("/api/v1/deploy", json=doc, headers=h.headers())
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [f"source.{field}"]
    assert h.store.count_deployments() == {}


async def test_rolling_with_both_limits_zero_is_refused_in_any_spelling(
    client: httpx.AsyncClient, h: Harness
) -> None:
    doc = body()
    doc["strategy"] = {"Rolling": {"max_surge": "00%", "max_unavailable": 0}}
    r = await client.post("/api/v1/deploy", json=doc, headers=h.headers())
    assert r.status_code == 422
    assert "cannot both be zero" in r.json()["detail"]


async def test_an_unknown_region_is_outside_the_schemas_enum(
    client: httpx.AsyncClient, h: Harness
) -> None:
    app_schema = (await client.get("/openapi.json")).json()
    target = app_schema["components"]["schemas"]["TargetEnvironment"]["properties"]["region"]
    assert target["enum"] == ["local"]
    r = await client.get("/api/v1/services/api?region=elsewhere", headers=h.headers())
    assert r.status_code == 422 and r.json()["error"] == "unknown_region"
