"""App secrets in an image replica on a real Docker Engine (the session's, tests/docker_engine.py):
the container's environment has ``secret_env``, and its secret files are in
``/run/shipyard-secrets`` (0700, files 0400) owned by the image's named ``USER`` (the engine
resolves it: ``copyUIDGID``), readable by the app."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from shipyard.agent import secret_files
from tests.agent.helpers import eventually
from tests.agent.test_containers import FAST, contained, image_spec, put
from tests.images import build_app_image

pytestmark = pytest.mark.docker

VALUE = "container-secret-3f9a1c"
KEY = "key-file-body-7d2e4b\n"

#: ``GET /`` answers the app's uid, its environment and what it finds in $SHIPYARD_SECRETS_DIR.
APP = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        d = os.environ.get("SHIPYARD_SECRETS_DIR", "")
        st = os.stat(d)
        files = {}
        for name in sorted(os.listdir(d)):
            f = os.path.join(d, name)
            with open(f) as fh:
                files[name] = [os.stat(f).st_mode & 0o7777, os.stat(f).st_uid, fh.read()]
        body = json.dumps({"uid": os.getuid(), "env": dict(os.environ), "files": files,
                           "dir": [st.st_mode & 0o7777, st.st_uid]}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def client(docker_engine: str) -> Iterator[docker.DockerClient]:
    c = docker.DockerClient(base_url=docker_engine)
    yield c
    c.close()


@pytest.fixture(scope="module")
def secrets_image(
    client: docker.DockerClient, python_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The app's image (``USER app``, a named user); its ID."""
    context = tmp_path_factory.mktemp("secrets-image")
    return build_app_image(
        client, context, {"app.py": APP}, "shipyard-test/secrets:v1", command=["python3", "app.py"]
    )


async def seen(port: int) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            r = await c.get(f"http://127.0.0.1:{port}/")
    except httpx.TransportError:
        return None
    return dict(json.loads(r.text)) if r.status_code == 200 else None


async def test_an_image_replica_gets_its_secrets(
    tmp_path: Path, docker_engine: str, client: docker.DockerClient, secrets_image: str
) -> None:
    spec = dataclasses.replace(
        image_spec(secrets_image, "shipyard-test/secrets:v1", env={"DB_PASSWORD": "run-env"}),
        secret_env={"DB_PASSWORD": VALUE},
        secret_files={"tls.key": KEY},
    )
    async with contained(tmp_path / "data", docker_engine, client, restart=FAST) as (_, api):
        r = await put(api, spec)
        assert r.status_code == 200, r.text
        [replica] = r.json()["replicas"]
        info = await eventually(lambda: seen(replica["port"]), what="the app answering")
        assert info["uid"] != 0
        assert info["env"]["DB_PASSWORD"] == VALUE
        assert info["env"]["SHIPYARD_SECRETS_DIR"] == secret_files.CONTAINER_DIR
        assert info["dir"] == [0o700, info["uid"]]
        assert info["files"] == {"tls.key": [0o400, info["uid"], KEY]}
