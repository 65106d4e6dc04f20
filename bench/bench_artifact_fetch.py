"""Artifacts on remote agents (issue 13): how long a joined agent takes to fetch a directory
artifact from the control plane and verify it, against copying the same tree with
``tar c | tar x`` (the least any copy of it costs).

The tree is a real built artifact comparable to the notes example built (480 files, 8.2 MB):
``LocalBuilder`` on a repository holding about 500 files / 7.5 MB of pure-Python packages
copied from this interpreter's site-packages (fastapi, pydantic, starlette, httpx, rich, ...)
whose build command makes a venv (so its links are in it). The control plane's route
(``api.fleet_artifacts``) runs under uvicorn in a process of its own on loopback (plain HTTP: the
fleet's mTLS adds a handshake per fetch, not per byte); the agent side is
``agent.fetching.ArtifactFetcher.localise`` into an empty cache: stream, safe extraction,
digest, read-only, rename. Contenders alternate in each round, after one warm-up each (page
cache warm, as on a control plane that just built the artifact). ``python bench/run.py
artifact_fetch``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROUNDS = 7
#: The anchor's row (a Markdown table cell: its pipe escaped).
ANCHOR = r"`tar c \| tar x` (anchor)"
PACKAGES = ("fastapi", "pydantic", "starlette", "httpx", "httpcore", "anyio", "h11", "idna",
            "uvicorn", "click", "rich")  # fmt: skip


def _site_packages() -> Path:
    import fastapi

    return Path(fastapi.__file__).resolve().parent.parent


def _build(root: Path) -> tuple[str, Path]:
    from shipyard.build.base import BuildRequest
    from shipyard.build.local import LocalBuilder
    from shipyard.domain.models import SourceConfig

    repo = root / "repo"
    deps = repo / ".deps"
    deps.mkdir(parents=True)
    site = _site_packages()
    for name in PACKAGES:
        shutil.copytree(
            site / name, deps / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    (repo / "app.py").write_text("print('app')\n")
    (repo / "shipyard.toml").write_text(
        '[service]\nname = "bench"\n\n[build]\ncommand = "python3 -m venv --without-pip .venv"'
        '\n\n[run]\ncommand = "python3 app.py"\n'
    )
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.invalid"}  # fmt: skip
    for args in (["init", "-q", "--initial-branch=main"], ["add", "-A"], ["commit", "-qm", "a"]):
        subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    source = SourceConfig(repository=str(repo), branch="main", commit=commit)
    artifact = asyncio.run(LocalBuilder(root / "builder").build(BuildRequest(source)))
    return artifact.digest, Path(artifact.location)


def _tree_stats(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            size += st.st_size if not os.path.islink(os.path.join(dirpath, n)) else 0
    return files, size


def serve(digest: str, path: str) -> None:
    """The control plane's side, in its own process: prints its port, serves until killed."""
    import socket

    import uvicorn
    from fastapi import FastAPI

    from shipyard.api.fleet_artifacts import artifact_routes

    async def resolve(asked: str) -> Path | None:
        return Path(path) if asked == digest else None

    def region() -> str:
        return "bench"

    app = FastAPI()
    app.include_router(artifact_routes(resolve, region))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _median(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"{statistics.median(ms):.0f} ms ({ms[0]:.0f}-{ms[-1]:.0f})"


async def _rounds(digest: str, location: Path, url: str, scratch: Path) -> dict[str, list[float]]:
    from shipyard.agent.fetching import ArtifactFetcher
    from shipyard.build.digest import artifact_dirname, verify_artifact
    from shipyard.runtime.base import RevisionSpec

    spec = RevisionSpec("bench", "r1", digest, "/not/here", ["python3", "app.py"])
    counter = iter(range(10_000))

    def fresh() -> Path:
        return scratch / f"run-{next(counter)}"

    async def fetch(compress: bool) -> None:
        cache = fresh()
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client:
            local = await ArtifactFetcher(client, cache, compress=compress).localise(spec)
        assert local.artifact_location == str(cache / artifact_dirname(digest))

    async def download_only() -> None:
        async with (
            httpx.AsyncClient(base_url=url, trust_env=False, timeout=60) as client,
            client.stream(
                "GET", f"/fleet/v1/artifacts/{digest}", headers={"accept-encoding": "identity"}
            ) as r,
        ):
            async for _chunk in r.aiter_bytes():
                pass

    async def tar_pipe() -> None:
        dest = fresh()
        dest.mkdir()
        proc = await asyncio.create_subprocess_shell(
            f"tar -C {location} -cf - . | tar -C {dest} -xf -"
        )
        assert await proc.wait() == 0

    async def verify_only() -> None:
        await asyncio.to_thread(verify_artifact, location, digest)

    contenders: dict[str, Callable[[], Awaitable[None]]] = {
        ANCHOR: tar_pipe,
        "fetch + verify, identity": lambda: fetch(False),
        "fetch + verify, gzip": lambda: fetch(True),
        "download alone (identity, bytes discarded)": download_only,
        "verify alone (digest of the tree)": verify_only,
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for run in contenders.values():  # warm-up
        await run()
    for _ in range(ROUNDS):
        for name, run in contenders.items():
            t = time.perf_counter()
            await run()
            samples[name].append(time.perf_counter() - t)
    return samples


def main() -> str:
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        root = Path(tmp)
        digest, location = _build(root)
        files, size = _tree_stats(location)
        server = subprocess.Popen(
            [sys.executable, __file__, "serve", digest, str(location)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            url = f"http://127.0.0.1:{port}"
            _wait_listening(url, digest)
            scratch = root / "scratch"
            scratch.mkdir()
            samples = asyncio.run(_rounds(digest, location, url, scratch))
        finally:
            server.terminate()
            server.wait(30)
    anchor = statistics.median(samples[ANCHOR])
    rows = "\n".join(
        f"| {name} | {_median(s)} | {statistics.median(s) / anchor:.1f}x |"
        for name, s in samples.items()
    )
    return (
        "## Artifacts on remote agents: fetch and verify\n\n"
        f"A built directory artifact of {files} files, {size / 1e6:.1f} MB (pure-Python "
        "packages and a venv; comparable to the notes example built, 480 files / 8.2 MB), "
        "fetched by a joined agent's `ArtifactFetcher.localise` from the control plane's "
        "`GET /fleet/v1/artifacts/{digest}` (uvicorn in its own process, loopback, plain HTTP) "
        "into an empty cache: tar streamed and extracted safely, digest verified, made "
        "read-only, renamed into place. Anchor: `tar c | tar x` of the same tree on the same "
        f"disk. Median (min-max) of {ROUNDS} rounds, contenders alternating, after a warm-up.\n\n"
        "| | time | vs anchor |\n|---|---|---|\n"
        f"{rows}\n\n"
        "The last two rows are parts of a fetch, for where its time goes: the stream alone "
        "(the control plane tars the tree in Python, uvicorn sends it, httpx reads it), and the "
        "digest, which the agent computes again before it starts the tree (`ArtifactVerifier`): "
        "the fetch's own check is what keeps a bad tree out of the cache. The rest is the "
        "extraction (`tarfile` in a worker thread, one file created per entry, as `tar x`).\n"
    )


def _wait_listening(url: str, digest: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.head(f"{url}/fleet/v1/artifacts/{digest}", trust_env=False)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3])
    else:
        print(main())
