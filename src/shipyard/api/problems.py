"""The one place errors become HTTP responses (RFC 9457 problem+json).

Every body carries ``error`` (a stable machine code, e.g. ``insufficient_permissions`` as the ADR's
handler answers), ``title``, ``status`` and ``detail`` saying what was wrong and what to do.
Installed on the app by ``api.app.create_app``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shipyard.errors import (
    AuthError,
    Conflict,
    DeploymentError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ShipyardError,
    TransientError,
    Unauthenticated,
)

PROBLEM = "application/problem+json"

#: Most specific first.
STATUS_BY_TYPE: list[tuple[type[ShipyardError], int]] = [
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (AuthError, 401),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 422),
    (TransientError, 503),
    (DeploymentError, 500),
]


def problem(status: int, error: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"error": error, "title": title, "status": status, "detail": detail, **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def status_for(exc: ShipyardError) -> int:
    for cls, status in STATUS_BY_TYPE:
        if isinstance(exc, cls):
            return status
    return 500


def _loc(loc: tuple[Any, ...]) -> str:
    # Drop the transport prefix ("body") and the union tags pydantic repeats
    # ("strategy.BlueGreen.BlueGreen.x" -> "strategy.BlueGreen.x").
    parts: list[str] = []
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if parts and parts[-1] == str(p):
            continue
        parts.append(str(p))
    return ".".join(parts) or "(body)"


def _field_error(e: Any) -> dict[str, str]:
    if e["type"] == "json_invalid":
        where = e["loc"][1] if len(e["loc"]) > 1 else "?"
        reason = (e.get("ctx") or {}).get("error", "invalid JSON")
        return {
            "field": "(body)",
            "message": f"body is not valid JSON: {reason} at character {where}",
        }
    return {"field": _loc(tuple(e["loc"])), "message": e["msg"]}


def install(app: FastAPI) -> None:
    @app.exception_handler(ShipyardError)
    async def _shipyard(_: Request, exc: ShipyardError) -> JSONResponse:
        status = status_for(exc)
        extra = {k: v for k, v in exc.detail.items() if k not in ("problems",)}
        resp = problem(status, exc.code, type(exc).__name__, exc.message, **extra)
        if isinstance(exc, TransientError):
            resp.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_field_error(e) for e in exc.errors()]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem(422, "invalid_request", "Invalid request", summary, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return problem(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            str(exc.detail),
        )
