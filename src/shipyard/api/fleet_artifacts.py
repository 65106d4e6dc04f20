"""``GET /fleet/v1/artifacts/{digest}``: the control plane hands a joined agent a directory
artifact it recorded, as a tar stream (``build.archive.stream_tree``).

Mounted on the fleet listener (``api/fleet.py``) with ``artifact_routes(resolve,
require_region)``: ``require_region`` is that module's dependency (a client certificate of a
region still registered, else 403), taken as a parameter so this router does not import it;
``resolve`` maps a digest to the directory to send, or None. ``recorded_artifacts`` is the
resolver the control plane uses: it answers only digests of revisions in its store whose
artifact is a directory, and only with the builder's own path for that digest
(``<data>/artifacts/sha256-<hex>``, never a path read from a record), so no request can name a
file of its choosing.

The response is ``application/x-tar`` built on the fly (no length known in advance, so chunked),
gzip-compressed (``Content-Encoding: gzip``) when the agent accepts it, with the digest in
``X-Shipyard-Artifact-Digest``. The agent unpacks it and checks the digest itself
(``agent.fetching``): the control plane is not trusted to have sent the right tree. A malformed
digest is a 400, an unknown one a 404 (problem+json, ``api.problems``).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from shipyard.api import problems
from shipyard.build.archive import stream_tree
from shipyard.build.digest import artifact_dirname
from shipyard.domain.clock import to_thread
from shipyard.store.db import AsyncStore

log = logging.getLogger("shipyard.api.fleet_artifacts")

#: The response header naming the digest served (``agent.fetching`` checks it).
DIGEST_HEADER = "X-Shipyard-Artifact-Digest"
#: zlib level for gzip responses: level 1 compresses a Python tree about 3x at a few hundred
#: MB/s; higher levels gain little on such trees and cost several times the CPU.
GZIP_LEVEL = 1

Resolver = Callable[[str], Awaitable[Path | None]]


def artifact_routes(resolve: Resolver, require_region: Callable[..., Any]) -> APIRouter:
    """The artifact route, guarded by ``require_region`` (see module docstring)."""
    router = APIRouter()

    @router.get(
        "/fleet/v1/artifacts/{digest}",
        responses={
            200: {"content": {"application/x-tar": {}}, "description": "The artifact's tree."},
            **problems.responses(400, 403, 404),
        },
        response_class=Response,
    )
    # A default, not ``Annotated``: FastAPI resolves string annotations in the module's
    # globals, and ``require_region`` is this function's parameter.
    async def artifact(
        digest: str,
        request: Request,
        region: Any = Depends(require_region),  # noqa: B008
    ) -> Response:
        try:
            artifact_dirname(digest)
        except ValueError:
            return problems.problem(
                400,
                "invalid_digest",
                "Malformed digest",
                f"{digest[:100]!r} is not an artifact digest (sha256:<64 hex digits>)",
            )
        path = await resolve(digest)
        if path is None:
            return problems.problem(
                404,
                "unknown_artifact",
                "Unknown artifact",
                f"the control plane has no directory artifact {digest}: no revision it "
                "recorded was built as it, or the build cache has evicted it (deploy again "
                "with --rebuild)",
            )
        gzip = _accepts_gzip(request.headers.get("accept-encoding", ""))
        headers = {DIGEST_HEADER: digest, "Cache-Control": "no-store"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        log.info("sending artifact %s to region %s%s", digest, region, " (gzip)" if gzip else "")
        return StreamingResponse(
            stream_tree(path, gzip_level=GZIP_LEVEL if gzip else None),
            media_type="application/x-tar",
            headers=headers,
        )

    return router


def recorded_artifacts(store: AsyncStore, artifacts_dir: Path) -> Resolver:
    """The control plane's resolver: ``artifacts_dir / sha256-<hex>`` when a recorded revision
    is a directory artifact of that digest and the directory is there (a real directory, not a
    link), else None."""

    async def resolve(digest: str) -> Path | None:
        name = artifact_dirname(digest)
        if not await store.has_directory_artifact(digest):
            return None
        path = artifacts_dir / name
        try:
            st = await to_thread(os.lstat, path)
        except FileNotFoundError:
            return None
        return path if stat.S_ISDIR(st.st_mode) else None

    return resolve


def _accepts_gzip(header: str) -> bool:
    """Whether ``Accept-Encoding`` names gzip with a non-zero weight."""
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() != "gzip":
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False
