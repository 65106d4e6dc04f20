"""The one place errors become HTTP responses (RFC 9457 problem+json).

Every body carries ``error`` (a stable machine code, e.g. ``insufficient_permissions`` as the ADR's
handler answers), ``title``, ``status`` and ``detail`` saying what was wrong and what to do.
Installed on the app by ``api.app.create_app``.

The same module says so in the OpenAPI schema: ``Problem`` and ``ValidationProblem`` are the
documents ``problem()`` writes, and ``responses(...)`` is what each route in ``api/app.py`` passes
as ``responses=`` to declare every status it can answer with its ``application/problem+json``
body (``install`` puts the models in the schema's components). tests/api/test_fuzz.py holds the
server to it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

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


class Problem(BaseModel):
    """An RFC 9457 problem document as ``problem()`` writes it: the four fields always, and
    whatever the error adds (``reason``, ``required_permission``, ``deployment_id``, ...)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="Stable machine code, e.g. insufficient_permissions.")
    title: str
    status: int = Field(ge=400, le=599, description="The HTTP status, repeated.")
    detail: str = Field(description="What was wrong and what to do next.")


class FieldError(BaseModel):
    """One invalid field of a request, as ``_field_error`` reports it."""

    field: str = Field(description="Dotted path in the body, or the parameter's name.")
    message: str


class ValidationProblem(Problem):
    """A 422: a request that failed validation (``error`` is ``invalid_request`` and ``errors``
    lists each field), or input the server refused (``invalid_input``, ``unknown_region``, ...)."""

    errors: list[FieldError] = Field(
        default_factory=list, description="Each invalid field (with error invalid_request)."
    )


#: Why each status is answered, as the schema says it.
_DESCRIPTIONS = {
    400: "The request is malformed.",
    401: "Missing, malformed, invalid, expired or revoked token (WWW-Authenticate: Bearer).",
    403: "The token lacks the permission (for this service).",
    404: "No such resource.",
    409: "The resource is not in a state that allows this.",
    413: "The request body is larger than the server accepts.",
    422: "Invalid parameters or body, or input the server refuses.",
    500: "The server failed unexpectedly.",
    503: "Temporarily unavailable; retry after Retry-After seconds.",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Always Bearer."}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering ``statuses`` as problem documents."""
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        model = ValidationProblem if status == 422 else Problem
        declared[status] = {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM: {"schema": _ref(model)}},
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
    return declared


def _components() -> dict[str, Any]:
    _, top = models_json_schema(
        [(m, "serialization") for m in (Problem, FieldError, ValidationProblem)],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = top["$defs"]
    return defs


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


def _allowed(request: Request) -> list[str]:
    """Every method some route answers at the request's path. Starlette names only the first
    route whose path matched, and a path can have one route per method (``GET`` and ``DELETE``
    of ``/api/v1/services/{name}``)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """The exception handlers, and the problem models in the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_components())
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point

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
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        resp = problem(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            str(exc.detail),
        )
        # 405 carries Allow (RFC 9110 15.5.6): what the resource does answer.
        resp.headers.update(exc.headers or {})
        if exc.status_code == 405:
            resp.headers["Allow"] = ", ".join(_allowed(request))
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug: the body says so in the documented shape and names no internals. Starlette
        # re-raises the exception after this answer, so the server logs its traceback.
        return problem(
            500,
            "internal_error",
            "Internal Server Error",
            "the server failed unexpectedly; the control plane's log has the details",
        )
