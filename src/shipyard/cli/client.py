"""What the CLI needs to talk to a running server: where it is, a token, and git lookups that
fill a DeploymentRequest's defaults from a local repository. Used by ``cli/main.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from shipyard.domain import repository_urls
from shipyard.errors import InvalidInput

DEFAULT_SERVER = "http://127.0.0.1:8080"


def resolve_token(token: str | None, data_dir: Path | None, permissions: list[str]) -> str:
    """--token, else $SHIPYARD_TOKEN, else a short-lived token minted with the server's key."""
    token = token or os.environ.get("SHIPYARD_TOKEN")
    if token:
        return token
    shared = os.environ.get("SHIPYARD_SHARED_DIR")  # replicas' keys (`serve --shared-dir`)
    shared_dir = Path(shared) if shared else None
    if data_dir is not None and ((shared_dir or data_dir) / "keys").exists():
        from shipyard.cli.token import issue_local

        return issue_local(data_dir, "cli", permissions, ttl_seconds=3600, shared_dir=shared_dir)
    raise InvalidInput(
        "no API token: pass --token, set SHIPYARD_TOKEN, or pass --data-dir of a local server "
        "(create one with `shipyard token create --data-dir DIR --subject you --permission ...`)"
    )


def _git(repo: str, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=60, check=True
        )
    except subprocess.CalledProcessError as exc:
        raise InvalidInput(
            f"git {' '.join(args)} failed in {repo}: {exc.stderr.strip()[:300]}"
        ) from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InvalidInput(f"cannot run git in {repo}: {exc}") from exc
    return out.stdout.strip()


def is_local(repository: str) -> bool:
    return "://" not in repository and not repository.startswith("git@")


def _commit_in(path: Path, commit: str) -> str | None:
    """The full id of ``commit`` in the local repository, or None when it has no such commit."""
    if not re.fullmatch(r"[0-9a-fA-F]{4,64}", commit):
        return None  # not an id: never handed to git, where it could read as a ref or option
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InvalidInput(f"cannot run git in {path}: {exc}") from exc
    return found.stdout.strip() if found.returncode == 0 else None


def _head_branch(repository: str) -> str:
    """The repository's HEAD branch, as ``shipyard build`` finds it (``source.default_branch``)."""
    from shipyard.build.source import default_branch

    return asyncio.run(default_branch(repository))


def source_defaults(
    repository: str, branch: str | None, commit: str | None
) -> tuple[str, str, str, str | None]:
    """(repository, branch, commit, manifest text or None) with defaults from the repository:
    the branch its HEAD names (a local checkout's current branch, a remote's default branch),
    that branch's head commit, and (local only) the commit's ``shipyard.toml``. Every refusal
    names its real cause: a path that does not exist, a directory that is not a repository, an
    unknown branch or commit. A URL with credentials is refused before git sees it (git would
    echo it in its errors)."""
    refusal = repository_urls.credentials_refusal(repository)
    if refusal is not None:
        raise InvalidInput(refusal)
    if is_local(repository):
        path = Path(repository).expanduser().resolve()
        if not path.exists():
            resolved = "" if str(path) == repository else f" ({path})"
            raise InvalidInput(
                f"repository path {repository} does not exist{resolved}; pass the directory of "
                "a git checkout, or a git URL"
            )
        if not (path / ".git").exists() and not (path / "HEAD").exists():
            raise InvalidInput(
                f"{path} is not a git repository (no .git in it); pass the top directory of a "
                "git checkout, or `git init` and commit first"
            )
        branch = branch or _head_branch(str(path))
        if commit is None:
            commit = _git(
                str(path), "for-each-ref", "--format=%(objectname)", f"refs/heads/{branch}"
            )
            if not commit:
                raise InvalidInput(f"branch {branch} not found in {path}", branch=branch)
        elif _commit_in(path, commit) is None:
            raise InvalidInput(
                f"commit {commit} not found in {path} (branch {branch}); `git log {branch}` "
                "lists its commits",
                repository=str(path),
                branch=branch,
                commit=commit,
            )
        try:
            manifest = _git(str(path), "show", f"{commit}:shipyard.toml")
        except InvalidInput:
            manifest = None
        return str(path), branch, commit, manifest
    branch = branch or _head_branch(repository)
    if commit is None:
        out = _git(".", "ls-remote", "--", repository, f"refs/heads/{branch}")
        if not out:
            raise InvalidInput(f"branch {branch} not found in {repository}")
        commit = out.split()[0]
    return repository, branch, commit, None


def trust(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """What verifies an https server: the system's CAs, or only ``ca_cert`` (PEM, from
    ``--ca-cert``/``$SHIPYARD_CA_CERT``) for a server whose certificate a private CA signed."""
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"--ca-cert {ca_cert}: cannot load it as PEM CA certificates ({exc})"
        ) from exc


def trace_context(environ: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context a CI job hands its steps in ``TRACEPARENT``/``TRACESTATE`` (the
    OpenTelemetry convention for environment variables as carriers), as request headers: the
    deployment's trace then continues the job's. Sent as given -- the server ignores a
    malformed one --, unless it could not even be a header value."""
    headers: dict[str, str] = {}
    for variable, header in (("TRACEPARENT", "traceparent"), ("TRACESTATE", "tracestate")):
        value = environ.get(variable, "").strip()
        if value and value.isascii() and value.isprintable():
            headers[header] = value
    return headers


class ApiClient:
    def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
        self._c = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=960.0),
            verify=trust(ca_cert),
        )

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._c.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """``request`` for an answer read as it arrives (``shipyard logs --follow``); a transport
        error while reading it is translated the same way."""
        try:
            with self._c.stream(method, path, **kw) as response:
                yield response
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: httpx.HTTPError) -> InvalidInput:
        if isinstance(exc, httpx.ConnectError):
            if _untrusted(exc):
                return InvalidInput(
                    f"the server at {self._c.base_url} presented a certificate this client does "
                    f"not trust ({_untrusted(exc)}): pass --ca-cert FILE or set SHIPYARD_CA_CERT "
                    "to the CA that signed it"
                )
            return InvalidInput(
                f"cannot reach the Shipyard server at {self._c.base_url}: start it with "
                "`shipyard serve` or pass --server"
            )
        return InvalidInput(f"request to {self._c.base_url} failed: {exc}")

    def close(self) -> None:
        self._c.close()

    def __del__(self) -> None:
        # Commands drop their client without closing it; a kept-alive (TLS) connection would
        # otherwise be left for the garbage collector to find unclosed.
        c = getattr(self, "_c", None)
        if c is not None:
            c.close()


def _untrusted(exc: BaseException) -> str | None:
    """The certificate verification failure somewhere down ``exc``'s cause chain, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None
