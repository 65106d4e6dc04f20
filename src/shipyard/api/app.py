"""The HTTP API (ADR section 6), FastAPI. ``create_app`` is what ``shipyard serve`` runs and what
in-process tests drive through ``httpx.ASGITransport``.

Routes are thin: they check the permission claim, validate, and call the pipeline (deployments,
as typed records) or the store (services). Both are awaited without blocking the event loop
(``store.db.AsyncStore`` runs SQLite in worker threads). Errors are mapped to problem+json in
``api/problems.py`` only.

    POST /api/v1/deploy                      deployment:create   202 (or ?wait=true: final result)
                                             a W3C ``traceparent`` header: the deployment's
                                             trace is a child of the caller's span
    POST /api/v1/rollback/{deployment_id}    deployment:rollback 202 (or ?wait=true)
    POST /api/v1/deployments/{id}/promote    deployment:create   202: Paused or Frozen goes on
    POST /api/v1/deployments/{id}/abort      deployment:rollback 202: weight 0 now, roll back
    GET  /api/v1/deployments/{id}            deployment:read
    GET  /api/v1/deployments?service=NAME    deployment:read
    GET  /api/v1/deployments/{id}/logs       deployment:read     build log, from ?offset=
    GET  /api/v1/deployments/{id}/audit      deployment:read
    GET  /api/v1/services                    deployment:read
    GET  /api/v1/services/{name}             deployment:read
    PUT  /api/v1/services/{name}/replicas    service:scale       scale (api/service_ops.py)
    DELETE /api/v1/services/{name}           service:delete      delete (api/service_ops.py)
    GET  /api/v1/services/{name}/logs        deployment:read     replica output (api/logs.py)
    GET  /api/v1/keys                        deployment:read     signing public keys (?format=pem)
    GET  /metrics                            deployment:read     Prometheus exposition
    GET  /api/v1/tokens                      token:admin         every issued token (no secrets)
    DELETE /api/v1/tokens/{token_id}         token:admin         revoke: 401 from the next request
    POST/GET /api/v1/regions, DELETE /{name} region:admin        remote regions (api/regions.py)
    PUT/GET/DELETE /api/v1/services/{name}/secrets[/{secret}]    app secrets (api/secrets.py)
    GET  /healthz                            no auth

Deployment permissions may be scoped to services (``deployment:create:web-*``, see
api/permissions.py): a route acting on a deployment or service checks the scope against that
service once it knows it (``claims.require(permission, service)``), list routes show only what
the token may read, and ``/metrics`` (every service's numbers) needs ``deployment:read`` for every
service.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from shipyard import __version__
from shipyard.api import docs, problems, service_ops
from shipyard.api import logs as logs_api
from shipyard.api import metrics as metrics_mod
from shipyard.api import notifications as notifications_api
from shipyard.api import regions as regions_api
from shipyard.api import schemas as api
from shipyard.api import secrets as secrets_api
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext, build_context
from shipyard.api.limits import BodySizeLimit, ConcurrencyLimit, HeaderCountLimit
from shipyard.domain import deployment_ids
from shipyard.domain.models import (
    DNS_LABEL,
    Deployment,
    DeploymentRequest,
    DeploymentResult,
    DeploymentStatus,
)
from shipyard.errors import NotFound, UnknownRegion
from shipyard.orchestrator.record import Record, dump_record
from shipyard.runtime.base import ReplicaStatus
from shipyard.security import signing
from shipyard.settings import Settings
from shipyard.store.leases import LeaseRow
from shipyard.store.tokens import TokenRow

CanCreate = Annotated[Claims, Depends(require_permission("deployment:create"))]
CanRollback = Annotated[Claims, Depends(require_permission("deployment:rollback"))]
CanRead = Annotated[Claims, Depends(require_permission("deployment:read"))]
CanAdminTokens = Annotated[Claims, Depends(require_permission("token:admin"))]
TokenId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
#: A deployment's id, or any unique prefix of it (``domain/deployment_ids.py``).
DeploymentRef = Annotated[
    str,
    Path(
        pattern=deployment_ids.PATTERN,
        description="The deployment's id, or a unique prefix of it "
        f"(at least {deployment_ids.MIN_PREFIX} characters).",
    ),
]
ServiceName = Annotated[str, Query(pattern=DNS_LABEL, max_length=63)]
Wait = Annotated[bool, Query(description="Answer when the deployment is final.")]
WaitTimeout = Annotated[float, Query(gt=0, le=3600)]


def ctx(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Ctx = Annotated[AppContext, Depends(ctx)]

#: What every route may answer before it runs: a body over the limit, an overloaded or failing
#: server. Routes add what they raise themselves (api/problems.py ``responses``).
_ANY = (413, 500, 503)
_AUTH = (401, 403, *_ANY)
#: The 2xx answers of a ``?wait=true`` route, and its 500 when the deployment failed.
_WAITED: dict[int | str, dict[str, Any]] = {
    200: {"model": DeploymentResult, "description": "With ?wait=true: the deployment succeeded."},
    202: {"model": api.DeploymentAccepted},
    500: {
        "model": api.DeploymentFailed,
        "description": "With ?wait=true: the deployment failed (application/json, the ADR's "
        "deployment_failed); or the server failed (a problem document).",
    },
}


def _declare(
    *statuses: int, answers: dict[int | str, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """``responses=``: problem documents for ``statuses``, merged with the route's other
    ``answers`` (a 500 may be both a problem and the ADR's ``deployment_failed``)."""
    declared = problems.responses(*statuses)
    for status, answer in (answers or {}).items():
        merged = declared.setdefault(status, {})
        content = {**merged.get("content", {}), **answer.get("content", {})}
        merged.update(answer)
        if content:
            merged["content"] = content
    return declared


def _resource(record: Record, driver: LeaseRow | None = None) -> dict[str, Any]:
    """``GET /deployments/{id}``: the ADR's deployment resource (``domain.models.Deployment``),
    with the replica driving it (``driver``: its lease) while it is in flight."""
    doc = dump_record(record)
    if driver is not None and not record.terminal:
        doc["driver"] = {"replica": driver.holder, "lease_expires_at": _utc(driver.expires_at)}
    return Deployment.model_validate(doc).model_dump(mode="json")


async def _deployment(c: AppContext, claims: Claims, permission: str, ref: str) -> Record:
    """The deployment ``ref`` (its id or a unique prefix) names, once ``claims`` are known to
    hold ``permission`` for its service. An ambiguous prefix is a 422 listing the candidates the
    token may read."""
    prefix = deployment_ids.normalise(ref)
    if len(prefix) == deployment_ids.FULL_LENGTH:
        deployment_id = prefix
    else:
        matches = await c.store.deployment_ids_with_prefix(prefix)
        deployment_id = deployment_ids.choose(
            prefix, matches, visible=lambda service: claims.may("deployment:read", service)
        )
    record = await c.pipeline.get(deployment_id)
    claims.require(permission, record.service)
    return record


def _token(row: TokenRow) -> dict[str, Any]:
    """A registry row as the API shows it: everything but the token, which is never kept."""
    return {
        "id": row.id,
        "subject": row.subject,
        "permissions": list(row.permissions),
        "issued_at": _utc(row.issued_at),
        "expires_at": _utc(row.expires_at),
        "issued_by": row.issued_by,
        "revoked_at": _utc(row.revoked_at) if row.revoked_at is not None else None,
        "revoked_by": row.revoked_by,
    }


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _accepted(request: Request, record: Record, detail: str | None = None) -> JSONResponse:
    """202 ``api.DeploymentAccepted``, with the status URL in the body and ``Location``."""
    url = str(request.url_for("get_deployment", deployment_id=record.id))
    return JSONResponse(
        {
            "deployment_id": record.id,
            "status": record.status.value,
            "status_url": url,
            "service": record.service,
            "region": record.region,
            "kind": record.kind,
            **({"detail": detail} if detail is not None else {}),
            **({"regions": record.regions} if record.fleet is not None else {}),
            **({"trace_id": record.trace_id} if record.trace_id is not None else {}),
        },
        status_code=202,
        headers={"Location": url},
    )


def _final(request: Request, record: Record) -> JSONResponse:
    """The ADR handler's answer: 200 with the result, or 500 deployment_failed (202 with the
    status URL if it is still running when the wait times out)."""
    result = record.result.model_dump(mode="json") if record.result is not None else None
    if record.status is DeploymentStatus.SUCCESS:
        return JSONResponse(result, status_code=200)
    if not record.terminal:
        return _accepted(
            request, record, "still running after the wait timeout; poll the status URL"
        )
    err = record.error.model_dump(mode="json") if record.error is not None else {}
    return JSONResponse(
        {
            "error": "deployment_failed",
            "message": err.get("message", record.status.value),
            "deployment_id": record.id,
            "status": record.status.value,
            "cause": err,
            "result": result,
        },
        status_code=500,
    )


async def _answer(
    request: Request, c: AppContext, record: Record, wait: bool, timeout: float
) -> JSONResponse:
    """202 with the status URL, or with ``wait`` the final answer (``_final``)."""
    if wait:
        return _final(request, await c.pipeline.wait(record.id, timeout))
    return _accepted(request, record)


def create_app(
    settings: Settings,
    *,
    context_factory: Callable[[Settings], Awaitable[AppContext]] = build_context,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context = await context_factory(settings)
        app.state.context = context
        app.state.tokens = context.tokens
        await context.pipeline.start()
        try:
            yield
        finally:
            await context.aclose()

    app = FastAPI(
        title="Shipyard",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # api/docs.py serves them without a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Added last, so they run first: refuse before authentication, body reading or routing.
    app.add_middleware(ConcurrencyLimit, max_requests=settings.max_concurrent_requests)
    app.add_middleware(HeaderCountLimit, max_headers=settings.max_header_count)
    if settings.docs:
        docs.install(app)
    problems.install(app)
    service_ops.install(app)  # PUT /services/{name}/replicas, DELETE /services/{name}
    app.include_router(logs_api.router)
    app.include_router(regions_api.router)  # /api/v1/regions (region:admin)
    app.include_router(secrets_api.router)  # /api/v1/services/{service}/secrets (secret:write)
    app.include_router(notifications_api.router)  # /api/v1/notifications (notifications:admin)
    # Joined regions come and go while serving: the schema follows the runtimes map.
    _declare_regions(
        app,
        lambda: (
            list(app.state.context.runtimes)
            if hasattr(app.state, "context")
            else list(settings.regions)
        ),
    )
    exposition = metrics_mod.MetricsEndpoint()

    @app.get(
        "/metrics",
        tags=["meta"],
        response_class=PlainTextResponse,
        responses=_declare(*_AUTH),
    )
    async def metrics(claims: CanRead, c: Ctx) -> Response:
        """Prometheus exposition; scrape with a token holding ``deployment:read`` (unscoped)."""
        claims.require_everywhere("deployment:read")
        body = await exposition.render(c.store, c.runtimes)
        return Response(body, media_type=metrics_mod.CONTENT_TYPE)

    @app.get("/healthz", tags=["meta"], responses=_declare(*_ANY))
    async def healthz() -> api.Health:
        return api.Health(status="ok", version=__version__)

    @app.post(
        "/api/v1/deploy",
        status_code=202,
        tags=["deployments"],
        response_model=None,
        # 400: a body that is not even text (FastAPI's "error parsing the body").
        responses=_declare(400, 409, 422, *_AUTH, answers=_WAITED),
    )
    async def deploy(
        body: DeploymentRequest,
        request: Request,
        claims: CanCreate,
        c: Ctx,
        wait: Wait = False,
        timeout: WaitTimeout = 900,
    ) -> JSONResponse:
        claims.require("deployment:create", body.target.service_name)
        record = await c.pipeline.submit(
            body,
            claims.subject,
            token_id=claims.token_id,
            # W3C trace context: the deployment's trace continues the caller's (a CI job's).
            traceparent=request.headers.get("traceparent"),
            tracestate=request.headers.get("tracestate"),
        )
        return await _answer(request, c, record, wait, timeout)

    @app.post(
        "/api/v1/rollback/{deployment_id}",
        status_code=202,
        tags=["deployments"],
        response_model=None,
        responses=_declare(404, 409, 422, *_AUTH, answers=_WAITED),
    )
    async def rollback(
        deployment_id: DeploymentRef,
        request: Request,
        claims: CanRollback,
        c: Ctx,
        wait: Wait = False,
        timeout: WaitTimeout = 900,
    ) -> JSONResponse:
        undone = await _deployment(c, claims, "deployment:rollback", deployment_id)
        record = await c.pipeline.rollback(
            undone.id,
            claims.subject,
            token_id=claims.token_id,
            traceparent=request.headers.get("traceparent"),
        )
        return await _answer(request, c, record, wait, timeout)

    @app.post(
        "/api/v1/deployments/{deployment_id}/promote",
        status_code=202,
        tags=["deployments"],
        response_model=None,
        # 400: a body that is not even text (FastAPI's "error parsing the body").
        responses=_declare(
            400, 404, 409, 422, *_AUTH, answers={202: {"model": api.DeploymentAccepted}}
        ),
    )
    async def promote(
        deployment_id: DeploymentRef,
        request: Request,
        claims: CanCreate,
        c: Ctx,
        decision: api.DecisionCreate | None = None,
    ) -> JSONResponse:
        """A Paused deployment goes on; a Frozen one too, with a ``reason`` (409 without)."""
        found = await _deployment(c, claims, "deployment:create", deployment_id)
        record = await c.pipeline.promote(
            found.id,
            claims.subject,
            token_id=claims.token_id,
            reason=decision.reason if decision else None,
        )
        return _accepted(request, record)

    @app.post(
        "/api/v1/deployments/{deployment_id}/abort",
        status_code=202,
        tags=["deployments"],
        response_model=None,
        responses=_declare(
            400,
            404,
            409,
            422,
            *_AUTH,
            answers={
                **_WAITED,
                200: {
                    "model": Deployment,
                    "description": "With ?wait=true: the deployment, aborted and rolled back.",
                },
            },
        ),
    )
    async def abort(
        deployment_id: DeploymentRef,
        request: Request,
        claims: CanRollback,
        c: Ctx,
        wait: Wait = False,
        timeout: WaitTimeout = 900,
        decision: api.DecisionCreate | None = None,
    ) -> JSONResponse:
        """Roll back a deployment in flight; a Frozen one only with a ``reason`` (409 without)."""
        found = await _deployment(c, claims, "deployment:rollback", deployment_id)
        record = await c.pipeline.abort(
            found.id,
            claims.subject,
            token_id=claims.token_id,
            reason=decision.reason if decision else None,
        )
        if not wait:
            return _accepted(request, record)
        final = await c.pipeline.wait(record.id, timeout)
        if final.status is DeploymentStatus.ROLLED_BACK:
            # The abort did what was asked: that is a success for its caller, not the ADR's
            # deployment_failed (which _final answers when the rollback itself failed).
            return JSONResponse(_resource(final), status_code=200)
        return _final(request, final)

    @app.get(
        "/api/v1/deployments/{deployment_id}",
        name="get_deployment",
        tags=["deployments"],
        response_model=Deployment,
        responses=_declare(404, 422, *_AUTH),
    )
    async def get_deployment(
        deployment_id: DeploymentRef, claims: CanRead, c: Ctx
    ) -> dict[str, Any]:
        record = await _deployment(c, claims, "deployment:read", deployment_id)
        doc = _resource(record, await c.pipeline.driver_of(record.id))
        if c.notifications is not None:  # its notifications' delivery state (issue 16)
            doc["notifications"] = await notifications_api.deliveries(c.notifications, record.id)
        return doc

    @app.get(
        "/api/v1/deployments",
        tags=["deployments"],
        response_model=api.DeploymentList,
        responses=_declare(422, *_AUTH),
    )
    async def list_deployments(
        claims: CanRead,
        c: Ctx,
        service: ServiceName | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """The newest deployments the token may read (of ``service``, if given)."""
        if service is not None:
            claims.require("deployment:read", service)
        matching = claims.scopes("deployment:read")
        records = await c.pipeline.history(service, limit, matching=matching)
        drivers = await c.pipeline.drivers([r.id for r in records if not r.terminal])
        return {"deployments": [_resource(r, drivers.get(r.id)) for r in records]}

    @app.get(
        "/api/v1/deployments/{deployment_id}/logs",
        tags=["deployments"],
        response_model=api.BuildLogRead,
        responses=_declare(404, 422, *_AUTH),
    )
    async def deployment_logs(
        deployment_id: DeploymentRef,
        claims: CanRead,
        c: Ctx,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """The build log from byte ``offset`` (at most 64 KiB); poll with the returned offset.
        An offset at or past the end of the log (or before it exists) answers no text and the
        log's end as ``offset``, so a client resumes from there."""
        record = await _deployment(c, claims, "deployment:read", deployment_id)
        path = c.pipeline.build_log_path(record.id)
        data = b""
        if path is not None and path.is_file():
            with path.open("rb") as f:
                # Clamped before seek: past a C long, or the file system's largest file (2^44
                # on ext4), seek itself raises.
                offset = min(offset, os.fstat(f.fileno()).st_size)
                f.seek(offset)
                data = f.read(64 * 1024)
        else:
            offset = 0
        return {
            "offset": offset + len(data),
            "text": data.decode("utf-8", errors="replace"),
            "building": record.status in (DeploymentStatus.PENDING, DeploymentStatus.BUILDING),
        }

    @app.get(
        "/api/v1/deployments/{deployment_id}/audit",
        tags=["deployments"],
        response_model=api.AuditList,
        responses=_declare(404, 422, *_AUTH),
    )
    async def deployment_audit(
        deployment_id: DeploymentRef, claims: CanRead, c: Ctx
    ) -> dict[str, Any]:
        # 404 for an unknown deployment, 403 for another service's
        found = await _deployment(c, claims, "deployment:read", deployment_id)
        records = await c.audit.records(deployment_id=found.id)
        return {"records": [r.to_dict() for r in records]}

    @app.get(
        "/api/v1/keys",
        tags=["keys"],
        response_model=None,
        responses=_declare(
            404,
            422,
            *_AUTH,
            answers={
                200: {
                    "model": api.KeyList,
                    "content": {
                        "application/x-pem-file": {"schema": {"type": "string"}},
                    },
                    "description": "The keys (JSON), or with ?format=pem the PEM text.",
                }
            },
        ),
    )
    async def signing_keys(
        _: CanRead, c: Ctx, format: Annotated[Literal["json", "pem"], Query()] = "json"
    ) -> dict[str, Any] | Response:
        """The public key(s) that verify this server's DSSE provenance envelopes, with the
        key id written into each signature (``security.signing.export_key``)."""
        # A public key is no secret, yet this route wants a token like every route but /healthz:
        # one rule with no exception to review, and the weakest permission suffices. Verifiers
        # without a token get the same key from `shipyard keys export`, published by the operator.
        gate = c.pipeline.deps.gate
        if gate is None:
            raise NotFound("this server signs no artifacts: it runs without a security gate")
        pem = await gate.public_key_pem()
        if format == "pem":
            return Response(pem, media_type="application/x-pem-file")
        return {"keys": [signing.export_key(signing.load_public_key(pem))]}

    @app.get(
        "/api/v1/services",
        tags=["services"],
        response_model=api.ServiceList,
        responses=_declare(*_AUTH),
    )
    async def list_services(claims: CanRead, c: Ctx) -> dict[str, Any]:
        """The services the token may read."""
        return {
            "services": [
                {
                    "service": s.service,
                    "region": s.region,
                    "serving_revision": s.serving_revision,
                    "url": s.url,
                }
                for s in await c.store.list_services()
                if claims.may("deployment:read", s.service)
            ]
        }

    @app.get(
        "/api/v1/services/{name}",
        tags=["services"],
        response_model=api.ServiceRead,
        responses=_declare(404, 422, *_AUTH),
    )
    async def get_service(
        name: Annotated[str, Depends(_service_name)],
        claims: CanRead,
        c: Ctx,
        region: Annotated[str, Query(pattern=DNS_LABEL)] = "local",
    ) -> dict[str, Any]:
        claims.require("deployment:read", name)
        if region not in c.runtimes:
            raise UnknownRegion(
                f"unknown region {region!r}; this server runs: {', '.join(c.runtimes)}"
            )
        row = await c.store.get_service(name, region)
        state = await c.runtimes[region].service_state(name)
        if row is None and state is None:
            raise NotFound(f"service {name} has never been deployed in region {region}")
        # A fleet's deployment in flight counts in each of its regions.
        active = await c.pipeline.records.active_for(name, region)
        replicas = list(state.replicas) if state else []
        return {
            "service": name,
            "region": region,
            "url": state.url if state else (row.url if row else None),
            "serving_revision": row.serving_revision if row else None,
            "warm_revision": row.warm_revision if row else None,
            "warm_until": row.warm_until if row else None,
            "weights": {k: v for k, v in state.weights.items() if v} if state else {},
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "revision": r.revision,
                    "state": r.state,
                    "ready": r.alive and r.routable,
                    "port": r.port,
                    "pid": r.pid,
                    "exit_code": r.exit_code,
                    "restarts": r.restarts,
                }
                for r in replicas
            ],
            "active_deployment": active.id if active else None,
            "warnings": service_warnings(
                row.serving_revision if row else None, replicas, active is not None
            ),
        }

    @app.get(
        "/api/v1/tokens",
        tags=["tokens"],
        response_model=api.TokenList,
        responses=_declare(*_AUTH),
    )
    async def list_tokens(_: CanAdminTokens, c: Ctx) -> dict[str, Any]:
        """Every token issued, newest first: ids, subjects, permissions, times; no token."""
        return {"tokens": [_token(row) for row in await c.tokens.list()]}

    @app.delete(
        "/api/v1/tokens/{token_id}",
        tags=["tokens"],
        response_model=api.TokenRead,
        responses=_declare(404, 422, *_AUTH),
    )
    async def revoke_token(token_id: TokenId, claims: CanAdminTokens, c: Ctx) -> dict[str, Any]:
        """Revoke a token: every server sharing the store refuses it from the next request."""
        row, _ = await c.tokens.revoke(token_id, by=claims.subject, by_token=claims.token_id)
        return _token(row)

    return app


def _declare_regions(app: FastAPI, regions: Callable[[], Sequence[str]]) -> None:
    """This server's regions as the schema's enum for every ``region`` it takes (the body's
    ``target.region``, ``?region=``): a client reads which exist, and a request naming another
    is one the schema already calls invalid (422 ``unknown_region``). ``regions`` is asked at
    each read; the schema is made again when the answer changed (a region joined or left)."""
    generate = app.openapi
    made_for: list[tuple[str, ...]] = []

    def openapi() -> dict[str, Any]:
        now = tuple(sorted(regions()))
        if made_for != [now]:
            app.openapi_schema = None
            made_for[:] = [now]
        schema = app.openapi_schema
        if schema is None:
            schema = generate()
            enum = {"enum": list(now)}
            target = schema["components"]["schemas"]["TargetEnvironment"]["properties"]
            target["region"].update(enum)
            for option in target.get("regions", {}).get("anyOf", []):
                if option.get("type") == "array":  # target.regions: each one of these, once
                    option["items"] = {**option.get("items", {}), **enum}
                    option["uniqueItems"] = True
            for path in schema["paths"].values():
                for operation in path.values():
                    for param in operation.get("parameters", []):
                        if param["name"] == "region":
                            param["schema"].update(enum)
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


def service_warnings(
    serving: str | None, replicas: Sequence[ReplicaStatus], in_flight: bool
) -> list[str]:
    """What a user must know about a service at a glance (``shipyard status`` prints these)."""
    warnings: list[str] = []
    if serving is not None and not any(r.alive and r.routable for r in replicas):
        warnings.append(
            f"no routable replica: the service answers 503 (serving revision {serving}); "
            "Shipyard restarts crashed replicas and repairs the region on its own"
        )
    elif (
        serving is not None
        and not in_flight
        and not any(r.revision == serving and r.alive and r.routable for r in replicas)
    ):
        warnings.append(f"the serving revision {serving} has no routable replica")
    for r in replicas:
        if r.restarts and not (r.alive and r.routable):
            warnings.append(
                f"replica {r.replica_id} is {r.state} after {r.restarts} restart(s)"
                + (f", last exit code {r.exit_code}" if r.exit_code is not None else "")
            )
        elif r.restarts >= 3:
            warnings.append(f"replica {r.replica_id} has restarted {r.restarts} times")
    return warnings


def _service_name(name: str) -> str:
    import re

    if not re.fullmatch(DNS_LABEL, name):
        raise NotFound(f"{name!r} is not a service name (services are DNS labels)")
    return name
