"""``/docs`` and ``/redoc`` load everything from this server (``api.docs``), and
``Settings.docs = False`` (``shipyard serve --no-docs``) removes them with the schema."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from shipyard.api.app import create_app
from tests.api.test_api import Harness

#: Every URL a page names: src/href attributes and the quoted URLs of its bootstrap script.
_URLS = re.compile(
    rb"""(?:src|href)\s*=\s*["']([^"']+)["']"""
    rb"""|(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']"""
)


@asynccontextmanager
async def client(tmp_path: Path, docs: bool) -> AsyncIterator[httpx.AsyncClient]:
    h = Harness(tmp_path)
    app = create_app(h.settings.model_copy(update={"docs": docs}), context_factory=h.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_name_only_same_origin_urls_and_they_load(
    tmp_path: Path, page: str
) -> None:
    async with client(tmp_path, docs=True) as c:
        r = await c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in r.headers["content-security-policy"]
        urls = [(a or b).decode() for a, b in _URLS.findall(r.content)]
        assert "/openapi.json" in urls and any(u.endswith(".js") for u in urls), urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"{page} names {url}"
            asset = await c.get(url)
            assert asset.status_code == 200, url
            assert asset.content, url
        assert b"cdn." not in r.content and b"fonts.googleapis" not in r.content


async def test_swagger_ui_does_not_send_the_schema_to_a_public_validator(tmp_path: Path) -> None:
    async with client(tmp_path, docs=True) as c:
        page = (await c.get("/docs")).text
    assert '"validatorUrl": null' in page


async def test_no_docs_means_no_pages_schema_or_assets(tmp_path: Path) -> None:
    async with client(tmp_path, docs=False) as c:
        for url in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js"):
            assert (await c.get(url)).status_code == 404, url
        assert (await c.get("/healthz")).status_code == 200
