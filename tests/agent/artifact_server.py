"""What the artifact-fetching tests share: a real built artifact (``LocalBuilder`` on a git
repository whose build makes a virtualenv, so the tree holds the venv's links, an executable
script and a relative link), the control plane's artifact route under a real uvicorn on an
ephemeral port, and hand-made tar streams for the refusals."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import tarfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response

from shipyard.api import problems
from shipyard.api.fleet_artifacts import DIGEST_HEADER, artifact_routes
from shipyard.build.base import Artifact, BuildRequest
from shipyard.build.cache import make_removable
from shipyard.build.local import LocalBuilder
from tests.build.helpers import GitRepo

#: The stand-in client certificate check: the real one (``api/fleet.py``'s ``require_region``)
#: reads the peer certificate; here a header names the region, and none is refused.
REGION_HEADER = "x-test-region"


def require_test_region(request: Request) -> str:
    region = request.headers.get(REGION_HEADER)
    if not region:
        raise HTTPException(403, "no client certificate")
    return region


def build_artifact(root: Path) -> Artifact:
    """A real directory artifact: an app, an executable script, a relative link, and a venv
    (``python3 -m venv --without-pip``: ``bin/python`` links to the base interpreter,
    ``bin/python3`` to ``python``) made by the build command."""
    repo = GitRepo(root / "repo")
    repo.write(
        "shipyard.toml",
        '[service]\nname = "svc"\n\n[build]\ncommand = "python3 -m venv --without-pip .venv"\n\n'
        '[run]\ncommand = "python3 app.py"\n',
    )
    repo.write("app.py", "print('hello')\n")
    repo.write("bin/tool", "#!/bin/sh\necho tool\n", executable=True)
    repo.write("static/data.bin", "x" * 100_000)
    repo.symlink("data", "static/data.bin")
    repo.commit("app")
    builder = LocalBuilder(root / "builder")
    return asyncio.run(builder.build(BuildRequest(repo.source())))


def copy_tree(source: Path, dest: Path) -> Path:
    """A writable copy of an artifact (links copied as links)."""
    shutil.copytree(source, dest, symlinks=True)
    make_removable(dest)
    return dest


class ArtifactServer:
    """``artifact_routes`` under uvicorn: ``served`` maps a digest to the directory sent (the
    tests' resolver: swap an entry to serve another tree under a digest); ``raw`` maps a digest
    to tar bytes sent as they are (for the hostile streams), ``requests`` counts the fetches."""

    def __init__(self) -> None:
        self.served: dict[str, Path] = {}
        self.raw: dict[str, bytes] = {}
        self.requests = 0
        app = FastAPI()
        problems.install(app)

        @app.middleware("http")
        async def count(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            self.requests += 1
            digest = request.url.path.rsplit("/", 1)[-1]
            if digest in self.raw:
                return Response(self.raw[digest], headers={DIGEST_HEADER: digest})
            return await call_next(request)

        async def resolve(digest: str) -> Path | None:
            return self.served.get(digest)

        app.include_router(artifact_routes(resolve, require_test_region))
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])), daemon=True
        )

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()


@contextmanager
def artifact_server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as server:
        yield server


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A tar stream of exactly ``members`` (content for regular files)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "", mode: int = 0o644) -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info
