"""The API test harness's fixtures, shared by every module that drives the app in process:
``h``, a ``Harness`` (fakes, store, audit, tokens; see tests/api/test_api.py) and ``client``, an
httpx client speaking ASGI to the app with its lifespan (pipeline, janitor) running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shipyard.api.app import create_app
from tests.api.test_api import Harness


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.fixture
async def client(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(h.settings, context_factory=h.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c
