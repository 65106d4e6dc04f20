"""The API's documentation pages, served entirely from this server: ``/docs`` (Swagger UI) and
``/redoc`` load their JavaScript, CSS and favicon from the ``fastapi-offline`` package's files
mounted under ``/docs-assets``, never from a CDN (a CDN sees every operator who opens the page,
and a compromised one runs script with the operator's token in reach).

Installed by ``api.app.create_app`` unless ``Settings.docs`` is off (``shipyard serve
--no-docs``), in which case ``/docs``, ``/redoc`` and ``/openapi.json`` all answer 404.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"

#: The pages run one inline bootstrap script; everything else must come from this origin, and
#: they may connect nowhere else (Swagger UI's default validator badge would post the schema's
#: URL to a public service: it is switched off, and this forbids it anyway).
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'"
)


def assets_dir() -> Path:
    """Where the installed ``fastapi-offline`` keeps Swagger UI's and ReDoc's files."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def install(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and the asset mount to ``app`` (created with ``docs_url=None``
    and ``redoc_url=None`` so FastAPI's CDN-backed pages are never registered)."""
    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["content-security-policy"] = _CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["content-security-policy"] = _CSP
        return page
