"""``LocalBuilder``: builds a commit on this machine into a sealed directory artifact.

Chosen by ``[build] builder = "local"`` (the default) through ``registry.builder_for``; the
orchestrator's build stage calls ``build``. Steps:

1. Fetch and resolve the source (``source.resolve_source``). If these inputs (commit tree id +
   this builder's configuration) were built before and the artifact is still in the store, it is
   verified (``verify_artifact``: one hash of the tree, about 8 ms for a 3 MB, 215-file Python
   app; no checkout, no command) and is the result. One that no longer verifies (modified on
   disk, e.g. an app wrote ``__pycache__`` into it, or unreadable) is dropped with its index
   entry, and with its dependency-cache entry when it hard-links that entry's files, and the
   build below runs; the build log and ``CacheReport.artifact_rejected`` say why.
   ``BuildRequest.no_cache`` skips this step and the dependency cache (step 3) altogether.
2. Export the commit's tree into a fresh workspace ``<data>/builds/<id>/src``; read the manifest.
3. Dependencies, cargo-chef style: ``[build] dependencies`` runs in a tree holding only the
   cache-key files (``[build] cache_key_files``, default: the lock/requirements files present).
   Its output is cached under a key over those files' content, the command and the tool it runs,
   and copied into the workspace, so a source-only change reuses it.
4. ``[build] command`` runs in the workspace.
5. Virtualenvs in it are made relocatable (``venvs.relocate``: console scripts name the build
   directory), then the workspace is checked (nothing written beside it, no symlink pointing out
   of it but a venv's link to its base interpreter), hashed
   (``digest.digest_tree``) and moved, read-only, to ``<data>/artifacts/sha256-<hex>``.

Commands run from argv lists (a shell only when the manifest says ``shell = true``) with a
scrubbed environment: ``PATH`` (``/usr/local/bin:/usr/bin:/bin``, not the server's), ``HOME``,
``LANG``, ``TMPDIR`` / ``XDG_CACHE_HOME`` (all in a scratch directory that is thrown away, so
what tools leave in HOME -- pip's and rustup's settings, caches -- never enters an artifact) and
``SOURCE_DATE_EPOCH``; nothing else of the server's environment (no tokens). One time budget,
``[build] timeout_seconds``, covers both commands; on expiry the whole process group is killed.

Writes outside the workspace: writes *beside* it (``../escape``, ``~/../x``) are detected and
fail the build. A command can still write to absolute paths the server's user may write (there is
no sandbox here); that cannot alter a sealed artifact unnoticed, because the artifact is addressed
by its digest and ``verify_artifact`` re-checks it before deploy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shipyard.build import cache as cache_mod
from shipyard.build.base import Artifact, BuildRequest, CacheReport
from shipyard.build.digest import UnsupportedEntry, digest_tree, verify_artifact
from shipyard.build.running import BuildLog, run_command
from shipyard.build.source import ResolvedSource, export_commit, manifest_of, resolve_source
from shipyard.build.venvs import interpreter_link, relocate
from shipyard.domain.manifest import Manifest, load_manifest
from shipyard.domain.models import BUILD_TIME_TARGET_MS
from shipyard.errors import ArtifactVerificationFailed, BuildFailed, ShipyardError
from shipyard.logs import SecretMasker
from shipyard.sandbox import Sandbox, SandboxPolicy

__all__ = [
    "DEFAULT_CACHE_KEY_FILES",
    "LocalBuilder",
    "LocalBuilderConfig",
    "digest_tree",
    "verify_artifact",
]

#: Dependency-declaring files looked for at the repository root when ``cache_key_files`` is unset.
DEFAULT_CACHE_KEY_FILES = (
    "requirements*.txt",
    "poetry.lock",
    "uv.lock",
    "Pipfile.lock",
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "Cargo.lock",
    "go.sum",
)
#: Bump when the build procedure changes in a way that must not reuse older cache entries.
_CACHE_FORMAT = "local-v2"  # v2: HOME moved out of the workspace and the recipe
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# 1980-01-01: a fixed SOURCE_DATE_EPOCH makes timestamp-embedding tools (zip, pyc) reproducible.
_SOURCE_DATE_EPOCH = "315532800"
_WORKSPACE, _SCRATCH, _RECIPE = "src", "tmp", "recipe"


class LocalBuilderConfig(BaseModel):
    """Server-side settings of the local builder (the registry's config model for "local")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local"] = "local"
    #: PATH given to build commands; None: /usr/local/bin:/usr/bin:/bin. Never the server's own
    #: PATH: Shipyard's virtualenv on it would be found by a build's ``python``/``pip``.
    path: str | None = None
    #: LRU budget for dependency-cache entries.
    cache_max_bytes: int = Field(default=5 * 2**30, ge=0)
    #: LRU budget for sealed artifacts; None keeps every artifact.
    artifacts_max_bytes: int | None = Field(default=None, ge=0)
    #: How cached dependencies enter the workspace: "hardlink" (default: a source-only rebuild
    #: costs no copy; a build that modifies a linked file in place fails and the entry is
    #: dropped, and every deploy re-verifies the artifact digest, so a file changed later is
    #: refused, never run) or "copy" (every artifact fully independent, slower).
    link_dependencies: Literal["copy", "hardlink"] = "hardlink"
    log_tail_lines: int = Field(default=30, ge=1, le=1000)


@dataclass(frozen=True)
class _Dependencies:
    hit: bool | None
    key: str | None = None
    entry: Path | None = None
    size: int = 0
    linked: tuple[tuple[str, int, int], ...] = ()  # (path, size, mtime_ns) when hardlinked


@dataclass(frozen=True)
class _Rejected:
    reason: str  # what was wrong with the cached artifact
    log_line: str  # that, what was dropped, and that it is being rebuilt


class LocalBuilder:
    kind = "local"

    def __init__(
        self,
        data_dir: Path,
        config: LocalBuilderConfig | None = None,
        *,
        sandbox: Sandbox | None = None,
        shared_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: Where logs/ and artifacts/ go (``serve --shared-dir``); the data directory without.
        self.shared_dir = shared_dir or data_dir
        #: Every command runs in it (secure by default: the data directory's own sandbox).
        self.sandbox = sandbox or Sandbox(SandboxPolicy(data_dir, hide=(self.shared_dir,)))
        self.config = config or LocalBuilderConfig()
        self.cache = cache_mod.BuildCache(
            data_dir,
            max_bytes=self.config.cache_max_bytes,
            artifacts_max_bytes=self.config.artifacts_max_bytes,
            artifacts_dir=self.shared_dir / "artifacts",
        )
        self._builds = data_dir / "builds"
        self._logs = self.shared_dir / "logs"
        self._builds.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)

    async def build(self, request: BuildRequest) -> Artifact:
        started = time.monotonic()
        durations: dict[str, int] = {}
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        log_path = self._logs / f"{stamp}-{uuid.uuid4().hex[:8]}.log"
        mask = SecretMasker.from_data_dir(self.data_dir, shared_dir=self.shared_dir)
        tail = self.config.log_tail_lines
        with BuildLog(
            log_path,
            request.log_sink,
            tail_lines=tail,
            mask=mask,
            max_bytes=request.max_log_bytes,
        ) as log:
            try:
                resolved = await resolve_source(request.source, cache_dir=self.data_dir)
                durations["fetch"] = _ms(started)
                log.note(f"source {resolved.repository} {resolved.branch} @ {resolved.commit}")
                inputs_key = self._inputs_key(resolved.tree)
                if request.no_cache:
                    log.note(
                        "no_cache requested: not reusing a cached artifact or dependency "
                        "environment; building from scratch"
                    )
                    return await self._build(
                        resolved, inputs_key, log, started, durations, no_cache=True
                    )
                hit = await asyncio.to_thread(self.cache.lookup_inputs, inputs_key)
                if hit is None:
                    return await self._build(resolved, inputs_key, log, started, durations)
                t = time.monotonic()
                rejected = await asyncio.to_thread(self._verify_hit, hit, inputs_key)
                durations["verify"] = _ms(t)
                if rejected is None:
                    return await self._cached(hit, resolved, inputs_key, log, started, durations)
                log.note(rejected.log_line)
                return await self._build(
                    resolved, inputs_key, log, started, durations, rejected=rejected.reason
                )
            except ShipyardError as exc:
                log.note(f"build failed: {exc.message}")
                exc.detail.setdefault("log_path", str(log_path))
                raise

    # --- the no-op rebuild ------------------------------------------------------------------

    def _verify_hit(self, hit: cache_mod.IndexEntry, inputs_key: str) -> _Rejected | None:
        """None if the cached artifact is exactly what was built; else drop it (blocking)."""
        try:
            verify_artifact(self.cache.artifact_path(hit.digest), hit.digest)
        except ArtifactVerificationFailed as exc:
            reason = _rejection(exc)
        else:
            return None
        dropped = "it and its index entry"
        try:
            self.cache.drop_artifact(hit.digest, inputs_key)
            if hit.dependencies_key is not None and self.config.link_dependencies == "hardlink":
                # The artifact's dependency files are hard links into the entry: an in-place
                # edit of one changed the entry too, so the entry cannot be trusted either.
                self.cache.drop_dependencies(hit.dependencies_key)
                dropped = "it, its index entry and the dependency-cache entry it shares files with"
        except OSError as exc:
            raise BuildFailed(
                f"cached artifact {hit.digest} failed verification ({reason}) and cannot be "
                f"removed: {exc}; remove {self.cache.artifact_path(hit.digest)} by hand and "
                "build again"
            ) from exc
        return _Rejected(
            reason=reason,
            log_line=(
                f"cached artifact {hit.digest} failed verification ({reason}); "
                f"dropped {dropped}; rebuilding"
            ),
        )

    async def _cached(
        self,
        hit: cache_mod.IndexEntry,
        resolved: ResolvedSource,
        inputs_key: str,
        log: BuildLog,
        started: float,
        durations: dict[str, int],
    ) -> Artifact:
        manifest = Manifest.model_validate(hit.manifest)
        path = self.cache.artifact_path(hit.digest)
        log.note(f"cache hit: tree {resolved.tree} was already built as {hit.digest}; no work done")
        durations["total"] = _ms(started)
        return Artifact(
            digest=hit.digest,
            kind="directory",
            location=str(path),
            commit=resolved.commit,
            manifest=manifest,
            builder=self.kind,
            duration_ms=durations["total"],
            cache=CacheReport(
                artifact_hit=True,
                dependencies_hit=None if manifest.build.dependencies is None else True,
                artifact_bytes=self.cache.artifact_bytes(hit.digest),
                dependencies_bytes=(
                    0
                    if hit.dependencies_key is None
                    else self.cache.dependencies_bytes(hit.dependencies_key)
                ),
                inputs_key=inputs_key,
                dependencies_key=hit.dependencies_key,
                durations_ms=durations,
            ),
            log_path=log.path,
            tree=resolved.tree,
        )

    # --- a real build -----------------------------------------------------------------------

    async def _build(
        self,
        resolved: ResolvedSource,
        inputs_key: str,
        log: BuildLog,
        started: float,
        durations: dict[str, int],
        *,
        no_cache: bool = False,
        rejected: str | None = None,
    ) -> Artifact:
        root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="b-", dir=self._builds))
        workspace, scratch = root / _WORKSPACE, root / _SCRATCH
        try:
            t = time.monotonic()
            await export_commit(resolved, workspace)
            with manifest_of(resolved):
                manifest = await asyncio.to_thread(load_manifest, workspace)
            await asyncio.to_thread((scratch / "cache").mkdir, parents=True)
            await asyncio.to_thread((scratch / "home").mkdir)
            service = manifest.service.name
            await asyncio.to_thread(self.sandbox.hand_over, service, workspace, scratch)
            durations["checkout"] = _ms(t)
            limit = manifest.build.timeout_seconds
            deadline = time.monotonic() + limit

            t = time.monotonic()
            deps = await self._dependencies(manifest, root, log, deadline, no_cache=no_cache)
            if deps.linked:  # the directories _place made; hard-linked cache files stay ours
                await asyncio.to_thread(self.sandbox.hand_over_dirs, service, workspace)
            elif deps.entry is not None:  # copies: the build's to change
                await asyncio.to_thread(self.sandbox.hand_over, service, workspace)
            durations["dependencies"] = _ms(t)

            argv = manifest.build.argv
            if argv is not None:
                t = time.monotonic()
                code = await run_command(
                    argv,
                    cwd=workspace,
                    sandbox=self.sandbox,
                    service=service,
                    writable=[workspace, scratch],
                    env=self._env(scratch=scratch),
                    limit_s=_remaining(deadline, limit, log),
                    budget_s=limit,
                    log=log,
                    what="build command",
                )
                durations["command"] = _ms(t)
                if code != 0:
                    raise self._failed(f"build command exited with code {code}", code, log)
            else:
                log.note("no [build] command: the artifact is the checked-out tree")

            t = time.monotonic()
            await asyncio.to_thread(self.sandbox.take_back, workspace)
            digest = await asyncio.to_thread(self._seal, root, deps, log)
            durations["digest"] = _ms(t)
            t = time.monotonic()
            published = await asyncio.to_thread(self.cache.publish_artifact, workspace, digest)
            if published.replaced is not None:
                log.note(
                    f"replaced the stored copy of {digest}, which failed verification "
                    f"({published.replaced})"
                )
            path, size = published.path, published.size
            await asyncio.to_thread(
                self.cache.record_inputs,
                inputs_key,
                cache_mod.IndexEntry(
                    digest=digest,
                    commit=resolved.commit,
                    manifest=manifest.model_dump(mode="json"),
                    dependencies_key=deps.key,
                ),
            )
            keep = frozenset(p for p in (path, deps.entry) if p is not None)
            eviction = await asyncio.to_thread(self.cache.evict, keep=keep)
            durations["publish"] = _ms(t)
        finally:
            await asyncio.to_thread(_remove_build_root, root)
        durations["total"] = _ms(started)
        log.note(
            f"built {digest} in {durations['total']} ms (ADR target {BUILD_TIME_TARGET_MS} ms: "
            f"{'met' if durations['total'] <= BUILD_TIME_TARGET_MS else 'MISSED'})"
        )
        return Artifact(
            digest=digest,
            kind="directory",
            location=str(path),
            commit=resolved.commit,
            manifest=manifest,
            builder=self.kind,
            duration_ms=durations["total"],
            cache=CacheReport(
                artifact_hit=False,
                dependencies_hit=deps.hit,
                cache_bytes=eviction.cache_bytes,
                evicted_entries=eviction.evicted,
                dependencies_bytes=deps.size,
                artifact_bytes=size,
                inputs_key=inputs_key,
                dependencies_key=deps.key,
                durations_ms=durations,
                no_cache=no_cache,
                artifact_rejected=rejected,
            ),
            log_path=log.path,
            tree=resolved.tree,
        )

    async def _dependencies(
        self, manifest: Manifest, root: Path, log: BuildLog, deadline: float, *, no_cache: bool
    ) -> _Dependencies:
        argv = manifest.build.dependencies_argv
        if argv is None:
            return _Dependencies(hit=None)
        workspace, scratch = root / _WORKSPACE, root / _SCRATCH
        patterns = manifest.build.cache_key_files or list(DEFAULT_CACHE_KEY_FILES)
        env = self._env(scratch=scratch)
        key, files = await asyncio.to_thread(_dependency_key, workspace, patterns, argv, env)
        entry = None if no_cache else await asyncio.to_thread(self.cache.lookup_dependencies, key)
        hit = entry is not None
        key_files = f"key files: {', '.join(files) or 'none'}"
        if entry is not None:
            log.note(f"dependency cache hit {key[:16]} ({key_files})")
        else:
            why = "no_cache: not looked up, the entry will be replaced; " if no_cache else ""
            log.note(f"dependency cache miss {key[:16]} ({why}{key_files})")
            recipe = root / _RECIPE
            await asyncio.to_thread(_copy_key_files, workspace, recipe, files)
            service = manifest.service.name
            await asyncio.to_thread(self.sandbox.hand_over, service, recipe)
            code = await run_command(
                argv,
                cwd=recipe,
                sandbox=self.sandbox,
                service=service,
                writable=[recipe, scratch],
                env=env,
                limit_s=_remaining(deadline, manifest.build.timeout_seconds, log),
                budget_s=manifest.build.timeout_seconds,
                log=log,
                what="dependency command",
            )
            # The cached entry is the server's, read-only to every later workload.
            await asyncio.to_thread(self.sandbox.take_back, recipe)
            if code != 0:
                raise self._failed(f"dependency command exited with code {code}", code, log)
            # Before it is cached: a venv in the entry must work in every workspace it is
            # copied into, and in the artifacts made from them.
            await asyncio.to_thread(self._relocate, recipe, [recipe], log)
            await asyncio.to_thread(_drop_key_files, recipe, files)
            entry = await asyncio.to_thread(
                self.cache.publish_dependencies, key, recipe, replace=no_cache
            )
        linked = await asyncio.to_thread(
            _place, entry, workspace, self.config.link_dependencies == "hardlink"
        )
        return _Dependencies(
            hit=hit,
            key=key,
            entry=entry,
            size=self.cache.dependencies_bytes(key),
            linked=linked,
        )

    def _seal(self, root: Path, deps: _Dependencies, log: BuildLog) -> str:
        """Check what the commands left and hash it (blocking; runs in a thread)."""
        stray = sorted(p.name for p in root.iterdir() if p.name not in (_WORKSPACE, _SCRATCH))
        if stray:
            raise BuildFailed(
                "the build wrote outside its workspace: "
                + ", ".join(f"../{name}" for name in stray)
                + "; write only inside the checked-out tree",
                outside=stray,
                log_tail=log.tail,
            )
        for rel, size, mtime in deps.linked:
            st = os.lstat(root / _WORKSPACE / rel)
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                assert deps.key is not None
                self.cache.drop_dependencies(deps.key)
                raise BuildFailed(
                    f"the build modified the cached dependency file {rel} in place; the "
                    "dependency cache entry was dropped (use link_dependencies='copy')",
                    log_tail=log.tail,
                )
        workspace = root / _WORKSPACE
        self._relocate(workspace, [workspace, root / _RECIPE], log)
        _check_symlinks(workspace)
        try:
            return digest_tree(workspace)
        except UnsupportedEntry as exc:
            raise BuildFailed(f"the build left an unsupported file: {exc}") from exc

    # --- helpers ----------------------------------------------------------------------------

    def _env(self, *, scratch: Path) -> dict[str, str]:
        return {
            "PATH": self.sandbox.visible_path(self.config.path or _DEFAULT_PATH),
            "HOME": str(scratch / "home"),
            "LANG": "C.UTF-8",
            "TMPDIR": str(scratch),
            "XDG_CACHE_HOME": str(scratch / "cache"),
            "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH,
        }

    def _relocate(self, tree: Path, old_roots: list[Path], log: BuildLog) -> None:
        """Make the virtualenvs in ``tree`` work from wherever it is moved (blocking)."""
        try:
            done = relocate(tree, old_roots=old_roots)
        except OSError as exc:
            raise BuildFailed(
                f"cannot make the build's virtualenv relocatable: {exc}", log_tail=log.tail
            ) from exc
        if done.scripts or done.pth_files:
            log.note(
                f"made {len(done.scripts)} virtualenv script(s) and {len(done.pth_files)} .pth "
                "file(s) relocatable (they named the build directory): "
                + ", ".join((done.scripts + done.pth_files)[:8])
                + (" ..." if len(done.scripts) + len(done.pth_files) > 8 else "")
            )

    def _inputs_key(self, tree: str) -> str:
        # The tree covers every file, shipyard.toml included; the rest is what else decides
        # the output: this builder's procedure and the PATH its commands see.
        config = self.config.model_dump(mode="json", include={"kind", "path", "link_dependencies"})
        config["path"] = config["path"] or _DEFAULT_PATH
        blob = json.dumps({"format": _CACHE_FORMAT, "tree": tree, "config": config}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _failed(self, message: str, code: int, log: BuildLog) -> BuildFailed:
        tail = log.tail
        shown = "\n".join(tail[-10:])
        return BuildFailed(
            f"{message}; last output:\n{shown}" if shown else f"{message} (no output)",
            exit_code=code,
            log_tail=tail,
        )


# --- dependency-step helpers (blocking; run in threads) ---------------------------------------


def _dependency_key(
    workspace: Path, patterns: Sequence[str], argv: Sequence[str], env: dict[str, str]
) -> tuple[str, list[str]]:
    files: dict[str, str] = {}
    for pattern in patterns:
        for match in sorted(workspace.glob(pattern)):
            rel = match.relative_to(workspace).as_posix()
            if match.is_symlink() or not match.is_file() or rel in files:
                continue  # key files are the commit's regular files
            files[rel] = hashlib.sha256(match.read_bytes()).hexdigest()
    tool_id = _tool_id(argv[0], env["PATH"])
    if list(argv[:2]) == ["/bin/sh", "-c"] and len(argv) == 3:
        # shell = true: the shell is not the tool; the script's first program is.
        first = argv[2].split(maxsplit=1)
        if first:
            tool_id += _tool_id(first[0], env["PATH"])
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "argv": list(argv),
            "files": sorted(files.items()),
            "tool": tool_id,
            "path": env["PATH"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest(), sorted(files)


def _tool_id(name: str, path: str) -> list[object]:
    """Which file ``name`` runs, and its size and mtime: a different interpreter or package
    manager must not reuse a dependency-cache entry. Empty when it cannot be found."""
    tool = shutil.which(name, path=path)
    if tool is None:
        return []
    real = os.path.realpath(tool)
    st = os.stat(real)
    return [real, st.st_size, st.st_mtime_ns]


def _copy_key_files(workspace: Path, recipe: Path, files: Sequence[str]) -> None:
    recipe.mkdir()
    for rel in files:
        (recipe / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(workspace / rel, recipe / rel)


def _drop_key_files(recipe: Path, files: Sequence[str]) -> None:
    # The checkout has them already; the entry holds only what the step produced.
    for rel in files:
        (recipe / rel).unlink(missing_ok=True)


def _place(entry: Path, workspace: Path, hardlink: bool) -> tuple[tuple[str, int, int], ...]:
    """Merge the entry's tree into the workspace; a file the commit has too is an error.

    Written against raw descriptors (``O_EXCL`` doubles as the collision check): this runs on
    every source-only rebuild, and its cost is one create + one copy per file.
    """
    linked: list[tuple[str, int, int]] = []
    _merge(os.fspath(entry), os.fspath(workspace), "", hardlink, linked)
    return tuple(linked)


def _merge(
    src: str, dst: str, rel: str, hardlink: bool, linked: list[tuple[str, int, int]]
) -> None:
    with os.scandir(src) as it:
        entries = list(it)
    for e in entries:
        target = os.path.join(dst, e.name)
        rel_name = f"{rel}{e.name}"
        try:
            if e.is_symlink():
                os.symlink(os.readlink(e.path), target)
            elif e.is_dir(follow_symlinks=False):
                try:
                    os.mkdir(target)
                except FileExistsError:
                    if os.path.islink(target) or not os.path.isdir(target):
                        raise
                _merge(e.path, target, rel_name + "/", hardlink, linked)
            elif hardlink:
                os.link(e.path, target)
                st = os.lstat(target)
                linked.append((rel_name, st.st_size, st.st_mtime_ns))
            else:
                _copy_file(e.path, target, stat.S_IMODE(e.stat(follow_symlinks=False).st_mode))
        except FileExistsError:
            raise BuildFailed(
                f"the dependency step produced {rel_name}, which the commit also contains; "
                "write dependencies to a directory of their own (e.g. --target .deps)"
            ) from None


def _copy_file(src: str, dst: str, mode: int) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode | 0o200)
        try:
            size = os.fstat(fin).st_size
            copied = 0
            while copied < size:
                n = os.sendfile(fout, fin, copied, size - copied)
                if n == 0:
                    break
                copied += n
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _check_symlinks(workspace: Path) -> None:
    root = os.path.realpath(workspace)
    for dirpath, dirs, files in os.walk(workspace):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.path.realpath(p)
                if target != root and not target.startswith(root + os.sep):
                    interpreter = interpreter_link(Path(p), workspace)
                    if interpreter == "ok":  # a venv's bin/python -> /usr/bin/python3
                        continue
                    if interpreter is not None:
                        raise BuildFailed(interpreter)
                    rel = os.path.relpath(p, workspace)
                    raise BuildFailed(
                        f"symlink {rel} -> {os.readlink(p)} points outside the artifact; "
                        "artifacts must be self-contained"
                    )


def _rejection(exc: ArtifactVerificationFailed) -> str:
    """What was wrong with a cached artifact, for the build log and ``CacheReport``."""
    actual = exc.detail.get("actual")
    if actual is not None:
        return f"its content was modified after the build: it now hashes to {actual}"
    return exc.message


def _remove_build_root(root: Path) -> None:
    if root.exists():
        cache_mod.make_removable(root)  # a build may leave read-only directories
        shutil.rmtree(root, ignore_errors=True)


def _remaining(deadline: float, limit: float, log: BuildLog) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BuildFailed(
            f"the build timed out after {limit:g} s ([build] timeout_seconds)",
            timeout_seconds=limit,
            log_tail=log.tail,
        )
    return left


def _ms(since: float) -> int:
    return int((time.monotonic() - since) * 1000)
