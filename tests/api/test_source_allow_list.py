"""``POST /api/v1/deploy`` with a repository outside the server's allow-list: 422 naming the
setting that would allow it, and nothing recorded (no deployment, no audit record)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shipyard.api.app import create_app
from shipyard.build.source_policy import SourcePolicy
from tests.api.test_api import Harness, body


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "data")


@pytest.fixture
async def client(h: Harness, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    (tmp_path / "repos" / "app").mkdir(parents=True)
    app = create_app(h.settings, context_factory=h.context)
    async with app.router.lifespan_context(app):
        # What `shipyard serve --source-root <tmp>/repos` builds (settings.source_policy).
        policy = SourcePolicy(roots=(tmp_path / "repos",), forbidden=(h.settings.data_dir,))
        app.state.context.pipeline.deps.source_policy = policy
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


@pytest.mark.parametrize(
    ("repository", "setting"),
    [
        ("http://git.example.invalid/org/app.git", "--allow-source"),
        ("git://git.example.invalid/org/app.git", "--allow-source"),
        ("ssh://git@git.example.invalid/org/app.git", "--allow-source"),
        ("/etc", "--source-root"),
        ("file:///etc", "--source-root"),
        ("{data}/git", "data directory"),
    ],
)
async def test_refused_with_422_and_nothing_recorded(
    client: httpx.AsyncClient, h: Harness, repository: str, setting: str
) -> None:
    request = body()
    request["source"]["repository"] = repository.format(data=h.settings.data_dir)
    r = await client.post("/api/v1/deploy", json=request, headers=h.headers())
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["error"] == "source_not_allowed"
    assert setting in problem["detail"]
    listed = await client.get("/api/v1/deployments", headers=h.headers())
    assert listed.json()["deployments"] == []
    assert await h.audit.records() == []


async def test_allowed_sources_are_accepted(
    client: httpx.AsyncClient, h: Harness, tmp_path: Path
) -> None:
    for i, repository in enumerate(
        ["https://git.example.invalid/org/app.git", str(tmp_path / "repos" / "app")]
    ):
        request = body(service=f"svc{i}")
        request["source"]["repository"] = repository
        r = await client.post("/api/v1/deploy", json=request, headers=h.headers())
        assert r.status_code == 202, r.text
