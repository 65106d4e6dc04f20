"""A fake world for canary and rolling executor tests: fake runtime/router with a synthetic load
on the fake clock, scripted health, an in-memory audit log and a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shipyard.build.fake import FakeBuilder
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import DeploymentRequest
from shipyard.runtime.fake import TrafficProfile
from tests.orchestrator.world import PipelineWorld

MANIFEST = """
[service]
name = "api"
[run]
command = "python3 app.py"
replicas = {replicas}
[health]
endpoint = "/health"
interval_seconds = 1
success_threshold = 2
failure_threshold = 3
[analysis]
min_success_rate = 0.99
max_p99_latency_ms = 200
min_requests = 50
interval_seconds = 10
[routing]
sticky_header = "x-user"
"""


class World(PipelineWorld):
    def __init__(self, tmp: Path, replicas: int = 1, rps: float = 100.0) -> None:
        manifest = parse_manifest(MANIFEST.format(replicas=replicas))
        super().__init__(tmp, builder=FakeBuilder(manifest=manifest), rps=rps)

    async def submit(self, commit: str, strategy: dict[str, Any]) -> dict[str, Any]:
        req = DeploymentRequest.model_validate(
            {
                "source": {"repository": "/repo", "branch": "main", "commit": commit},
                "target": {"service_name": "api", "region": "local"},
                "strategy": strategy,
            }
        )
        return await self.pipeline.submit(req, "alice")

    async def deploy(self, commit: str, strategy: dict[str, Any]) -> dict[str, Any]:
        doc = await self.submit(commit, strategy)
        return await self.pipeline.wait(doc["id"])

    async def first(self) -> str:
        doc = await self.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
        assert doc["status"] == "Success", doc.get("error")
        return str(doc["green_revision"])

    def revision(self, commit: str, doc: dict[str, Any]) -> str:
        return f"{commit[:7]}-{doc['id'][:8]}"

    def profile(self, revision: str, error_rate: float = 0.0, latency_ms: float = 2.0) -> None:
        self.runtime.router.profiles[revision] = TrafficProfile(error_rate, latency_ms)

    async def events(self, deployment_id: str) -> list[Any]:
        return list(await self.audit.records(deployment_id=deployment_id))
