"""A joined agent's copy of the control plane's directory artifacts: fetched by digest, unpacked
safely, verified, then kept in the agent's own cache.

An agent on another host cannot run ``/srv/shipyard/artifacts/sha256-...`` from the control
plane's disk. ``ArtifactFetcher.localise`` (called by ``agent.server.Agent.localise`` for every
revision it is asked to start or restores, before ``agent.verify.ArtifactVerifier`` checks
signature and digest) returns the spec with ``artifact_location`` pointing into
``<cache_dir>/sha256-<hex>/``, fetching ``GET /fleet/v1/artifacts/{digest}`` from the control
plane first when the cache does not hold it (``api.fleet_artifacts`` serves it; over the fleet's
mutual TLS, which the client given here carries).

A fetch streams the tar into ``build.archive.extract_tree`` (a worker thread reading from a
bounded queue, so at most ``_QUEUE_CHUNKS`` batches of 256 KiB wait in memory) inside a fresh
``.fetch-*`` directory beside the cache entries; the unpacked tree must then hash to the digest
(``build.digest.verify_artifact``), is made read-only, and only then renamed into place (one
atomic rename: a reader sees the whole artifact or none). Anything wrong -- an unknown digest,
an unsafe or oversized tar, a tree that hashes to something else, a dropped connection --
raises ``ArtifactVerificationFailed`` (``check`` = ``fetch``, ``archive`` or ``digest``) and the
temporary directory is removed: nothing is left behind, and nothing starts.

A cached artifact is verified again on every use (about 30 ms for 480 files, see
``agent/verify.py``) and fetched anew if it no longer verifies; the spec the agent stores in
``state.json`` names the cache, so an agent restarted while the control plane is down restores
its revisions from it. Images pass through unchanged (the agent pulls them by digest,
``agent.images``). Cache eviction is not done yet: entries stay until removed by hand.

Cost (bench/bench_artifact_fetch.py, 510 files / 6.5 MB built, loopback, a loaded 2-core
machine): about 0.3 s for fetch + extract + verify against about 0.08 s for ``tar c | tar x`` of
the same tree on the same disk; about half of it is the stream itself (the control plane tars in
Python, and HTTP/1.1 chunked framing is parsed in Python on both ends). Once per revision and
host: starts after that, and restarts, use the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import httpx

from shipyard.build import cache as build_cache
from shipyard.build.archive import Extracted, ExtractLimits, UnsafeArchive, extract_tree
from shipyard.build.digest import artifact_dirname, verify_artifact
from shipyard.errors import ArtifactVerificationFailed
from shipyard.runtime.base import RevisionSpec

log = logging.getLogger("shipyard.agent.fetching")

#: The response header naming the digest served (``api.fleet_artifacts`` sets it).
DIGEST_HEADER = "x-shipyard-artifact-digest"
#: Chunks waiting between the network and the extracting thread, at most, and their size.
_QUEUE_CHUNKS = 8
_BATCH_BYTES = 1 << 18
#: How often a producer blocked on a full queue looks whether the extractor gave up.
_PUT_POLL_S = 0.1


class ArtifactFetchFailed(ArtifactVerificationFailed):
    """The artifact could not be fetched (unknown digest, an HTTP error, the connection lost).
    Keeps its parent's code, so the control plane sees ``artifact_verification_failed`` with
    ``check: fetch`` like every other refusal to start an unverified artifact."""


class ArtifactFetcher:
    """Fetches directory artifacts by digest into ``cache_dir`` (see module docstring).

    ``client``: an ``httpx.AsyncClient`` whose ``base_url`` is the control plane's fleet
    listener (for a joined agent: its mTLS client, agent certificate and fleet CA); ``limits``:
    bounds on one artifact; ``compress``: ask for a gzip stream (a Python tree shrinks about
    3x, which a WAN link feels; on loopback it made no measurable difference either way,
    bench/bench_artifact_fetch.py)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        cache_dir: Path,
        *,
        limits: ExtractLimits | None = None,
        compress: bool = True,
    ) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self.limits = limits or ExtractLimits()
        self.compress = compress
        self._locks: dict[str, asyncio.Lock] = {}

    async def localise(self, spec: RevisionSpec) -> RevisionSpec:
        """``spec`` pointing at this agent's verified copy of its artifact (fetched if need
        be); an image spec unchanged. ``ArtifactVerificationFailed`` when there is none."""
        if spec.artifact_kind != "directory":
            return spec
        digest = spec.artifact_digest
        try:
            name = artifact_dirname(digest)
        except ValueError as exc:
            raise ArtifactFetchFailed(
                f"cannot fetch the artifact of {spec.service}/{spec.revision}: {exc}",
                check="fetch",
                reason="malformed_digest",
                digest=digest,
            ) from exc
        target = self.cache_dir / name
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:  # two starts of one revision fetch it once
            if await asyncio.to_thread(target.is_dir):
                try:
                    await asyncio.to_thread(verify_artifact, target, digest)
                except ArtifactVerificationFailed as exc:
                    log.warning("cached artifact %s no longer verifies (%s); fetching it again",
                                digest, exc.message)  # fmt: skip
                    await asyncio.to_thread(_remove, target)
                else:
                    return dataclasses.replace(spec, artifact_location=str(target))
            try:
                await self._fetch(digest, target)
            except OSError as exc:  # this machine's trouble: disk full, permissions
                raise ArtifactFetchFailed(
                    f"cannot store artifact {digest} in {self.cache_dir}: "
                    f"{exc.strerror or exc}; nothing was kept",
                    check="fetch",
                    reason="local_storage",
                    digest=digest,
                ) from exc
        return dataclasses.replace(spec, artifact_location=str(target))

    async def _fetch(self, digest: str, target: Path) -> None:
        await asyncio.to_thread(self.cache_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, "", ".fetch-", self.cache_dir))
        try:
            tree = scratch / "tree"
            tree.mkdir()
            extracted = await self._download(digest, tree)
            try:
                await asyncio.to_thread(verify_artifact, tree, digest)
            except ArtifactVerificationFailed as exc:
                actual = exc.detail.get("actual")
                what = f"hashes to {actual}" if actual else "cannot be hashed"
                raise ArtifactVerificationFailed(
                    f"the control plane served artifact {digest}, but what it sent {what}; "
                    "nothing was kept",
                    **{**exc.detail, "check": "digest", "reason": "content_mismatch"},
                ) from exc
            await asyncio.to_thread(build_cache.make_read_only, tree)
            await asyncio.to_thread(tree.rename, target)
            log.info("fetched artifact %s: %d entries, %d bytes", digest, extracted.entries,
                     extracted.bytes)  # fmt: skip
        finally:
            await asyncio.to_thread(_remove, scratch)

    async def _download(self, digest: str, tree: Path) -> Extracted:
        """Stream the artifact's tar into ``extract_tree`` running in a worker thread."""
        pipe = _ChunkPipe()
        headers = {"accept-encoding": "gzip" if self.compress else "identity"}
        extracting = asyncio.ensure_future(asyncio.to_thread(_extract, pipe, tree, self.limits))
        cap = self.limits.max_stream_bytes
        try:
            async with self.client.stream(
                "GET", f"/fleet/v1/artifacts/{digest}", headers=headers
            ) as r:
                if r.status_code != 200:
                    raise await _refused(r, digest)
                served = r.headers.get(DIGEST_HEADER)
                if served != digest:
                    raise ArtifactFetchFailed(
                        f"asked the control plane for artifact {digest}, it answered with "
                        f"{(served or 'no digest')[:100]}",
                        check="fetch",
                        reason="wrong_digest",
                        digest=digest,
                    )
                received = 0
                batch = bytearray()
                async for chunk in r.aiter_bytes():
                    received += len(chunk)
                    if received > cap:
                        raise ArtifactVerificationFailed(
                            f"artifact {digest} is larger than this agent accepts "
                            f"({cap} bytes of tar); nothing was kept",
                            check="archive",
                            reason="too_large",
                            digest=digest,
                        )
                    batch += chunk
                    # One thread hop per batch, not per socket read (64 KiB or less).
                    if len(batch) >= _BATCH_BYTES:
                        if not await asyncio.to_thread(pipe.put, bytes(batch)):
                            break  # the extractor stopped: its error says why
                        batch.clear()
                else:
                    if batch:
                        await asyncio.to_thread(pipe.put, bytes(batch))
            await asyncio.to_thread(pipe.put, None)
        except BaseException as exc:
            pipe.abort()
            with contextlib.suppress(BaseException):
                await extracting
            if isinstance(exc, httpx.HTTPError):
                raise ArtifactFetchFailed(
                    f"fetching artifact {digest} from the control plane failed: {exc!r}"[:500],
                    check="fetch",
                    reason="unreachable",
                    digest=digest,
                ) from exc
            raise
        try:
            return await extracting
        except UnsafeArchive as exc:
            raise ArtifactVerificationFailed(
                f"refused artifact {digest} from the control plane: {exc}; nothing was kept",
                check="archive",
                reason=exc.reason,
                digest=digest,
            ) from exc


async def _refused(r: httpx.Response, digest: str) -> ArtifactFetchFailed:
    """The control plane's refusal as an error naming what it said."""
    body = (await r.aread())[:2000]
    try:
        problem = json.loads(body)
        said = str(problem.get("detail") or problem)[:300]
    except (ValueError, AttributeError):
        said = body.decode(errors="replace")[:300]
    reason = {404: "unknown_digest", 400: "malformed_digest", 403: "forbidden"}.get(
        r.status_code, "http_error"
    )
    return ArtifactFetchFailed(
        f"the control plane has no artifact {digest} to send ({r.status_code}: {said})"
        if r.status_code == 404
        else f"the control plane refused to send artifact {digest} ({r.status_code}: {said})",
        check="fetch",
        reason=reason,
        status=r.status_code,
        digest=digest,
    )


def _extract(pipe: _ChunkPipe, tree: Path, limits: ExtractLimits) -> Extracted:
    try:
        return extract_tree(pipe, tree, limits)
    finally:
        pipe.reader_done()


def _remove(path: Path) -> None:
    if path.exists() or path.is_symlink():
        build_cache.make_removable(path)
        shutil.rmtree(path, ignore_errors=True)


class _Aborted(Exception):
    """The download stopped; the extracting thread ends with this."""


class _ChunkPipe:
    """Chunks from the event loop to a worker thread's ``read``: a bounded queue, so a slow
    disk holds back the download instead of filling memory. ``put`` returns False once the
    reader is gone (it failed, or the tar ended), so the producer never blocks for ever."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._buffer = memoryview(b"")
        self._gone = threading.Event()
        self._aborted = threading.Event()
        self._eof = False

    def put(self, chunk: bytes | None) -> bool:
        """Blocking (a worker thread calls it): hand over ``chunk`` (None: the end)."""
        while not self._gone.is_set():
            try:
                self._queue.put(chunk, timeout=_PUT_POLL_S)
            except queue.Full:
                continue
            return True
        return False

    def abort(self) -> None:
        """The download failed: the reader raises at its next read."""
        self._aborted.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def reader_done(self) -> None:
        self._gone.set()

    def read(self, size: int = -1, /) -> bytes:
        while not self._buffer:
            if self._eof:
                return b""
            chunk = self._queue.get()
            if self._aborted.is_set():
                raise _Aborted("the download stopped")
            if chunk is None:
                self._eof = True
                return b""
            self._buffer = memoryview(chunk)
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:n])
        self._buffer = self._buffer[n:]
        return out
