"""Fetching a source: repository + branch + commit -> a fresh checked-out tree and its manifest.

Called by every builder (``local.py``, ``docker.py``, ``cloudbuild.py``) and by the orchestrator's
build stage through them. One bare mirror per repository lives under ``cache_dir`` (keyed by a hash
of the normalized URL or path) and is updated by ``git fetch`` on every call. The commit is
resolved to its full id, must exist and must be reachable from the branch; its tree is written
into a fresh workspace straight from the object database (``git ls-tree`` + ``git cat-file
--batch``), so no ``.gitattributes`` filter, hook or working-tree state can change what is built.

Safety: git only ever runs from argv lists (never a shell); user input is validated before it
reaches git (no leading ``-``, no transport-helper syntax such as ``ext::``), options end with
``--`` / ``--end-of-options``, only the file/git/http(s)/ssh transports are allowed, URLs with
credentials in them are refused (``domain.repository_urls``), and fetched objects are
fsck-checked. Every git call runs with a timeout.

Two levels of API: ``fetch_source`` does everything; ``resolve_source`` + ``export_commit`` +
``read_manifest_at`` let a builder decide from the commit's tree id alone that the work was
already done (the no-op rebuild) without writing a single file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from shipyard.domain import repository_urls
from shipyard.domain.manifest import MANIFEST_NAME, Manifest, load_manifest, parse_manifest
from shipyard.domain.models import SourceConfig
from shipyard.errors import ManifestError, SourceError
from shipyard.logs import log_event

log = logging.getLogger("shipyard.build.source")

#: Transports git may use; ``ext::`` (runs commands) and friends are never allowed.
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
FETCH_TIMEOUT_S = 300.0
LOCAL_GIT_TIMEOUT_S = 60.0
_MAX_ERROR_CHARS = 800
_URL_SCHEMES = frozenset({"http", "https", "ssh", "git", "file"})
#: ``user@host:path`` (scp-like ssh); no slash before the colon.
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)[^\x00]*$")
# Environment variables that would point git at another repository than the one we name.
_GIT_LOCATION_VARS = frozenset(
    {
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_PREFIX",
        "GIT_QUARANTINE_PATH",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
    }
)


@dataclass(frozen=True)
class ResolvedSource:
    """A commit that exists and is on its branch, inside an up-to-date mirror."""

    repository: str  # as given in the request
    location: str  # what git fetches from: a URL or an absolute local path
    mirror: Path  # the bare mirror under cache_dir
    branch: str
    commit: str  # full commit id
    tree: str  # the commit's tree id: identical trees build identical artifacts


@dataclass(frozen=True)
class SourceCheckout:
    """A commit's tree written into a fresh workspace, with its parsed manifest."""

    commit: str
    tree: str
    workspace: Path
    manifest: Manifest
    source: ResolvedSource


async def fetch_source(
    source: SourceConfig, *, cache_dir: Path, workspace: Path | None = None
) -> SourceCheckout:
    """Fetch, resolve, verify and export ``source``; parse its ``shipyard.toml``.

    ``workspace`` must not exist yet (it is created); by default a fresh directory under
    ``cache_dir/workspaces``. The caller owns the workspace and removes it when done.
    Raises ``SourceError`` (repository, branch or commit) or ``ManifestError``.
    """
    resolved = await resolve_source(source, cache_dir=cache_dir)
    if workspace is None:
        root = cache_dir / "workspaces"
        root.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix="ws-", dir=root)) / "src"
    await export_commit(resolved, workspace)
    with manifest_of(resolved):
        manifest = load_manifest(workspace)
    return SourceCheckout(
        commit=resolved.commit,
        tree=resolved.tree,
        workspace=workspace,
        manifest=manifest,
        source=resolved,
    )


async def resolve_source(source: SourceConfig, *, cache_dir: Path) -> ResolvedSource:
    """Update the repository's mirror and resolve ``source.commit`` on ``source.branch``."""
    location = normalize_repository(source.repository)
    branch = _check_branch(source.branch)
    mirror = await _update_mirror(location, source.repository, cache_dir)
    ref = f"refs/heads/{branch}"
    # The common case in one git call; anything unusual (unknown branch or commit, an ambiguous
    # or ref-shadowed abbreviation) takes the step-by-step path below for a precise error.
    found: list[str] = []
    if re.fullmatch(r"[0-9a-f]{4,64}", source.commit):  # hex: never read as an option
        quick = await _git(
            [
                "rev-parse",
                f"{ref}^{{commit}}",
                *(f"{source.commit}^{{{t}}}" for t in ("commit", "tree")),
            ],
            git_dir=mirror,
            check=False,
        )
        found = quick.text.splitlines() if quick.returncode == 0 else []
    if len(found) == 3 and found[1].startswith(source.commit):
        commit, tree = found[1], found[2]
    else:
        await _branch_ref(mirror, branch, source.repository)
        commit = await _resolve_commit(mirror, source.commit, source.repository, branch)
        tree = (
            await _git(
                ["rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}"],
                git_dir=mirror,
            )
        ).text
    on_branch = await _git(
        ["merge-base", "--is-ancestor", "--", commit, ref], git_dir=mirror, check=False
    )
    if on_branch.returncode == 1:
        raise SourceError(
            f"commit {source.commit} is not on branch {branch} of {source.repository}",
            repository=source.repository,
            branch=branch,
            commit=commit,
        )
    if on_branch.returncode != 0:
        raise SourceError(
            f"cannot check commit {commit} against branch {branch}: {_cut(on_branch.stderr)}"
        )
    return ResolvedSource(
        repository=source.repository,
        location=location,
        mirror=mirror,
        branch=branch,
        commit=commit,
        tree=tree,
    )


async def branch_head(repository: str, branch: str, *, cache_dir: Path) -> str:
    """The full commit id at the tip of ``branch`` (the CLI's default ``--commit``)."""
    location = normalize_repository(repository)
    mirror = await _update_mirror(location, repository, cache_dir)
    ref = await _branch_ref(mirror, _check_branch(branch), repository)
    head = await _git(
        ["rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}"], git_dir=mirror
    )
    return head.text


async def default_branch(repository: str) -> str:
    """The branch the repository's ``HEAD`` names (``git ls-remote --symref -- REPO HEAD``):
    for a local path its checked-out branch, for a remote its default branch. What ``shipyard
    build`` and ``shipyard deploy`` use when no ``--branch`` is given, so both agree and neither
    assumes ``main``. ``SourceError`` when it cannot be reached or its HEAD names no branch."""
    location = normalize_repository(repository)
    listed = await _git(
        ["ls-remote", "--symref", "--", location, "HEAD"],
        git_dir=None,
        limit_s=FETCH_TIMEOUT_S,
        check=False,
    )
    if listed.returncode != 0:
        reason = summarise_fetch_error(listed.stderr)
        raise SourceError(
            f"repository {repository!r} could not be read: {reason}",
            repository=repository,
            reason=reason,
        )
    for line in listed.text.splitlines():
        target, _, name = line.partition("\t")
        if name == "HEAD" and target.startswith("ref: refs/heads/"):
            return _check_branch(target.removeprefix("ref: refs/heads/"))
    raise SourceError(
        f"repository {repository!r} has no default branch (its HEAD is detached or the "
        "repository is empty); pass --branch",
        repository=repository,
    )


async def _update_mirror(location: str, repository: str, cache_dir: Path) -> Path:
    mirror = mirror_path(cache_dir, location)
    async with _mirror_lock(mirror):
        created = not (mirror / "HEAD").is_file()
        if created:
            await _git(["init", "--bare", "--quiet", "--", str(mirror)], git_dir=None)
            (mirror / "shipyard-source").write_text(location + "\n", encoding="utf-8")
        fetched = await _git(
            [
                "-c",
                "transfer.fsckObjects=true",
                "fetch",
                "--prune",
                "--no-tags",
                "--quiet",
                "--no-recurse-submodules",
                "--",
                location,
                "+refs/heads/*:refs/heads/*",
            ],
            git_dir=mirror,
            limit_s=FETCH_TIMEOUT_S,
            check=False,
        )
        if fetched.returncode != 0 and created:  # don't keep empty mirrors of typos
            await asyncio.to_thread(shutil.rmtree, mirror, ignore_errors=True)
    if fetched.returncode != 0:
        # git's stderr for a remote carries text the remote server chose (and its URL): the
        # raw text goes to the server's log only, cut and with control characters escaped;
        # the deployer sees what kind of failure it was.
        reason = summarise_fetch_error(fetched.stderr)
        log_event(
            log,
            "source.fetch_failed",
            repository=repository_urls.redacted(repository),
            reason=reason,
            exit_code=fetched.returncode,
            stderr=_cut(fetched.stderr).encode("unicode_escape").decode("ascii"),
            level=logging.WARNING,
        )
        raise SourceError(
            f"repository {repository!r} could not be fetched: {reason}",
            repository=repository,
            reason=reason,
        )
    return mirror


#: (what git says, in lower case; the summary a deployer sees), most specific first.
_FETCH_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("could not resolve host", "name or service not known", "temporary failure in name"),
     "could not resolve host"),
    (("connection refused",), "connection refused"),
    (("timed out", "timeout"), "timed out"),
    (("ssl", "certificate", "tls"), "TLS handshake or certificate verification failed"),
    (("network is unreachable", "no route to host", "failed to connect", "couldn't connect"),
     "could not connect"),
    (("not found", "does not appear to be a git repository", "not a git repository",
      "authentication failed", "could not read username", "could not read password",
      "permission denied", "access denied", "access rights", "401", "403", "404",
      "terminal prompts disabled", "no such file or directory"),
     "repository not found or access denied"),
    (("transport", "not allowed"), "transport not allowed"),
    (("fsck", "object", "pack"), "the fetched objects failed git's integrity check"),
)  # fmt: skip


def summarise_fetch_error(stderr: str) -> str:
    """One of a few fixed phrases for why a fetch failed (never git's own words: they can hold
    text the remote server chose); ``git fetch failed`` when none fits."""
    said = stderr.lower()
    for needles, summary in _FETCH_FAILURES:
        if any(n in said for n in needles):
            return summary
    return "git fetch failed"


async def _branch_ref(mirror: Path, branch: str, repository: str) -> str:
    ref = f"refs/heads/{branch}"
    head = await _git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
        git_dir=mirror,
        check=False,
    )
    if head.returncode != 0:
        raise SourceError(
            f"branch {branch!r} not found in {repository}", repository=repository, branch=branch
        )
    return ref


async def export_commit(resolved: ResolvedSource, dest: Path) -> None:
    """Write the commit's tree into ``dest`` (created; must not exist) from the object database.

    Regular files keep git's executable bit (0755 / 0644), symlinks are recreated as links,
    submodules (gitlinks) are skipped. Paths are checked again here: nothing is written outside
    ``dest`` whatever the tree contains.
    """
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=False)
    listing = await _git(
        ["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", resolved.commit],
        git_dir=resolved.mirror,
    )
    entries: list[tuple[str, str, str]] = []  # (mode, oid, path)
    for record in listing.stdout.split(b"\0"):
        if not record:
            continue
        meta, _, raw_path = record.partition(b"\t")
        mode, kind, oid = meta.decode("ascii").split(" ")
        if kind != "blob":  # "commit": a submodule, not part of this repository's content
            continue
        entries.append((mode, oid, _safe_relative(os.fsdecode(raw_path))))
    if entries:
        try:
            await _write_blobs(resolved.mirror, dest, entries)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)
            raise


async def read_manifest_at(resolved: ResolvedSource) -> Manifest:
    """Parse ``shipyard.toml`` from the commit without checking anything out."""
    blob = await _git(
        ["cat-file", "blob", f"{resolved.commit}:{MANIFEST_NAME}"],
        git_dir=resolved.mirror,
        check=False,
    )
    with manifest_of(resolved):
        if blob.returncode != 0:
            raise ManifestError(
                f"{MANIFEST_NAME} not found at the repository root; add one with [service] name "
                "and [run] command (see README)"
            )
        return parse_manifest(blob.stdout.decode("utf-8", errors="replace"))


@contextlib.contextmanager
def manifest_of(resolved: ResolvedSource) -> Iterator[None]:
    """A ``ManifestError`` raised inside says which commit (and branch) the manifest was read
    from: a user fixing ``shipyard.toml`` must know whether the server saw their latest commit.
    Used wherever a builder reads the manifest (here, ``local.py``, ``docker.py``)."""
    try:
        yield
    except ManifestError as exc:
        where = f"commit {resolved.commit[:12]} (branch {resolved.branch})"
        message = exc.message
        if message.startswith(f"{MANIFEST_NAME}:"):  # "shipyard.toml: field: problem"
            message = f"{MANIFEST_NAME} at {where}{message[len(MANIFEST_NAME) :]}"
        else:
            message = f"{where}: {message}"
        raise ManifestError(
            message, **{**exc.detail, "commit": resolved.commit, "branch": resolved.branch}
        ) from exc


async def repository_file(resolved: ResolvedSource, path: str, *, what: str = "file") -> str:
    """The repository-relative path of the regular file ``path`` names in the commit, following
    symlinks *inside* the repository; ``SourceError`` when it is missing, not a file, or leads
    outside the repository (absolute or ``..`` escapes, directly or through a link)."""
    current = path
    for _ in range(16):  # symlink hops, as the kernel's MAXSYMLINKS spirit
        rel = _inside_repository(current, path, what)
        listing = await _git(
            ["ls-tree", "-z", "--full-tree", "--end-of-options", resolved.commit, "--", rel],
            git_dir=resolved.mirror,
        )
        record = listing.stdout.split(b"\0")[0]
        meta, _, found = record.partition(b"\t")
        if not record or os.fsdecode(found) != rel:
            raise SourceError(f"{what} {path!r} not found in commit {resolved.commit[:12]}")
        mode, kind, oid = meta.decode("ascii").split(" ")
        if mode == "120000":
            target = (await _git(["cat-file", "blob", oid], git_dir=resolved.mirror)).stdout
            link = os.fsdecode(target)
            if link.startswith("/"):
                raise SourceError(f"{what} {path!r} is a symlink pointing outside the repository")
            current = str(PurePosixPath(rel).parent / link)
            continue
        if kind != "blob":
            raise SourceError(f"{what} {path!r} is not a file in commit {resolved.commit[:12]}")
        return rel
    raise SourceError(f"{what} {path!r}: too many levels of symbolic links")


def _inside_repository(candidate: str, original: str, what: str) -> str:
    parts: list[str] = []
    for part in candidate.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise SourceError(
                    f"{what} {original!r} points outside the repository; it must stay inside it"
                )
            parts.pop()
        else:
            parts.append(part)
    if candidate.startswith("/") or not parts:
        raise SourceError(f"{what} {original!r} must be a relative path inside the repository")
    return "/".join(parts)


# --- validation ------------------------------------------------------------------------------


def normalize_repository(repository: str) -> str:
    """The URL or absolute path git fetches from; rejects anything git could read as an option
    or as a transport helper (``ext::sh -c ...``)."""
    repo = repository.strip()
    # First, so no message below repeats a credential (and no mirror records one).
    refusal = repository_urls.credentials_refusal(repo)
    if refusal is not None:
        raise SourceError(refusal)
    if not repo or repo.startswith("-") or "\x00" in repo or "\n" in repo:
        raise SourceError(f"repository {repository!r} is not a git URL or a path")
    if "://" in repo:
        parts = urlsplit(repo)
        scheme = parts.scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise SourceError(
                f"repository {repository!r}: scheme {scheme!r} is not allowed "
                f"(use one of {', '.join(sorted(_URL_SCHEMES))}, or a local path)"
            )
        if scheme == "file":
            return _local_path(parts.path, repository)
        if parts.netloc.startswith("-") or not parts.netloc:
            raise SourceError(f"repository {repository!r} has no valid host")
        return parts._replace(scheme=scheme, netloc=parts.netloc.lower()).geturl().rstrip("/")
    if "::" in repo:
        raise SourceError(f"repository {repository!r}: transport helpers are not allowed")
    path = Path(repo).expanduser()
    if path.is_absolute() or path.exists() or repo.startswith("."):
        return _local_path(repo, repository)
    if _SCP_LIKE.match(repo):
        return repo
    return _local_path(repo, repository)


def _local_path(raw: str, original: str) -> str:
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise SourceError(f"repository {original!r} not found (no such directory {path})")
    return str(path)


def is_scp_like(repository: str) -> bool:
    """``[user@]host:path``: how ``normalize_repository`` recognises an scp-like ssh remote."""
    return bool(_SCP_LIKE.match(repository))


def mirror_path(cache_dir: Path, location: str) -> Path:
    key = hashlib.sha256(location.encode()).hexdigest()[:32]
    return cache_dir / "git" / f"{key}.git"


def _check_branch(branch: str) -> str:
    # SourceConfig validated the dangerous characters; check-ref-format covers git's full rules.
    if branch.startswith("-") or not re.fullmatch(r"[^\x00-\x20\x7f~^:?*\[\\]+", branch):
        raise SourceError(f"{branch!r} is not a valid git branch name")
    parts = branch.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") or p.endswith(".lock") for p in parts):
        raise SourceError(f"{branch!r} is not a valid git branch name")
    if "@{" in branch or branch == "@" or ".." in branch:
        raise SourceError(f"{branch!r} is not a valid git branch name")
    return branch


async def _resolve_commit(mirror: Path, commit: str, repository: str, branch: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{4,64}", commit):
        raise SourceError(f"commit {commit!r} is not a hex commit id")
    found = await _git(
        ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}"],
        git_dir=mirror,
        check=False,
    )
    if found.returncode == 0 and found.text.startswith(commit):
        return found.text
    # Not found, ambiguous, or the hex string is also a ref name (refs win in rev-parse):
    # list every object with that prefix and keep the commits.
    candidates = await _git(["rev-parse", f"--disambiguate={commit}"], git_dir=mirror, check=False)
    oids = [line for line in candidates.text.splitlines() if line.startswith(commit)]
    commits: list[str] = []
    if oids:
        types = await _git(
            ["cat-file", "--batch-check=%(objectname) %(objecttype)"],
            git_dir=mirror,
            stdin=("\n".join(oids) + "\n").encode(),
        )
        commits = [
            oid
            for oid, _, kind in (ln.partition(" ") for ln in types.text.splitlines())
            if kind == "commit"
        ]
    if not commits:
        raise SourceError(
            f"commit {commit} not found in {repository} (branch {branch})",
            repository=repository,
            branch=branch,
            commit=commit,
        )
    if len(commits) > 1:
        raise SourceError(
            f"commit {commit} is ambiguous in {repository} ({len(commits)} commits match); "
            "give more characters",
            repository=repository,
            commit=commit,
        )
    return commits[0]


def _safe_relative(path: str) -> str:
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or any(p in ("", ".", "..") for p in path.split("/"))
        or any(p.lower() == ".git" for p in pure.parts)
    ):
        raise SourceError(f"the commit contains an unsafe path {path!r}; refusing to export it")
    return path


# --- writing the tree -------------------------------------------------------------------------

_BATCH_BYTES = 8 << 20
_BATCH_FILES = 512


@dataclass(frozen=True)
class _Blob:
    mode: str
    path: Path
    data: bytes


def _write_batch(blobs: Sequence[_Blob]) -> None:
    for blob in blobs:
        blob.path.parent.mkdir(parents=True, exist_ok=True)
        if blob.mode == "120000":
            os.symlink(os.fsdecode(blob.data), blob.path)
            continue
        perm = 0o755 if blob.mode == "100755" else 0o644
        fd = os.open(blob.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, perm)
        with os.fdopen(fd, "wb") as out:
            out.write(blob.data)
        os.chmod(blob.path, perm)  # the umask must not decide the artifact's modes


async def _write_blobs(mirror: Path, dest: Path, entries: Sequence[tuple[str, str, str]]) -> None:
    """Stream the blobs out of ``git cat-file --batch``; files are written off the event loop."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        "--git-dir",
        str(mirror),
        "cat-file",
        "--batch",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=git_env(),
    )
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None
    assert stdout is not None

    async def feed() -> None:
        for _, oid, _ in entries:
            stdin.write(oid.encode() + b"\n")
            await stdin.drain()
        stdin.close()

    async def consume() -> None:
        batch: list[_Blob] = []
        pending = 0
        for mode, oid, rel in entries:
            header = (await stdout.readline()).decode("ascii", errors="replace").split()
            if len(header) != 3 or header[0] != oid or header[1] != "blob":
                raise SourceError(f"git cat-file answered {header!r} for {rel}")
            data = await stdout.readexactly(int(header[2]))
            await stdout.readexactly(1)  # the newline after each object
            batch.append(_Blob(mode, dest / rel, data))
            pending += len(data)
            if pending >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
                await asyncio.to_thread(_write_batch, batch)
                batch, pending = [], 0
        await asyncio.to_thread(_write_batch, batch)

    limit = LOCAL_GIT_TIMEOUT_S + len(entries) * 0.01
    feeder = asyncio.create_task(feed())
    try:
        async with asyncio.timeout(limit):
            await consume()
            await feeder
            await proc.wait()  # cat-file ends at the end of its input
    except BaseException as exc:
        feeder.cancel()
        # Only here: Popen.kill() polls first, which would reap a process that already exited
        # behind asyncio's child watcher.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise SourceError(f"exporting the commit timed out after {limit:.0f} s") from exc
        if isinstance(exc, asyncio.IncompleteReadError | ValueError):
            raise SourceError(f"git cat-file stopped early: {exc}") from exc
        raise


# --- running git --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GitResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace").strip()


def git_env() -> dict[str, str]:
    """The server's environment minus anything that points git elsewhere, plus safe transports
    and no interactive prompts (a missing credential fails instead of hanging). An operator's
    own ``GIT_ASKPASS`` is kept: it is one of the ways README's 'Private repositories' gives the
    server credentials (credentials in URLs are refused)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env.update(
        GIT_ALLOW_PROTOCOL=ALLOWED_PROTOCOLS,
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS=os.environ.get("GIT_ASKPASS") or "true",
        LC_ALL="C",
    )
    return env


async def _git(
    args: Sequence[str],
    *,
    git_dir: Path | None,
    limit_s: float = LOCAL_GIT_TIMEOUT_S,
    check: bool = True,
    stdin: bytes | None = None,
) -> _GitResult:
    argv = ["git"]
    if git_dir is not None:
        argv += ["--git-dir", str(git_dir)]
    argv += list(args)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_env(),
    )
    try:
        async with asyncio.timeout(limit_s):
            out, err = await proc.communicate(stdin)
    except TimeoutError as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SourceError(f"git {args[0]} timed out after {limit_s:.0f} s") from exc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    result = _GitResult(proc.returncode or 0, out, err.decode("utf-8", errors="replace"))
    if check and result.returncode != 0:
        raise SourceError(f"git {args[0]} failed: {_cut(result.stderr)}")
    return result


def _cut(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."


_LOCK_POLL_S = 0.05


@contextlib.asynccontextmanager
async def _mirror_lock(mirror: Path) -> AsyncIterator[None]:
    """One fetch per mirror at a time, across tasks and processes (``flock`` on a side file;
    each call opens its own descriptor, so tasks of one process exclude each other too)."""
    mirror.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{mirror}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_S)  # another fetch of this mirror is running
        yield
    finally:
        os.close(fd)  # closing releases the lock
