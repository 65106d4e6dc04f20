"""Which repositories this server fetches from: an allow-list of URL patterns and local roots
(``shipyard serve --allow-source PATTERN``, ``--source-root DIR``).

Whoever may deploy names ``source.repository``, and the server fetches it as its own user: a
local path can name any git repository the server can read (the data directory holds every
service's mirror: deploying another service's mirror would hand over its code), and a URL
makes the server open connections where the deployer chooses (``http://``/``git://`` without
integrity, internal hosts). So, by default:

* remote: ``https://*`` only. ``http://``, ``git://``, ``ssh://`` and scp-like ``host:path`` are
  refused unless a pattern allows them (``--allow-source 'ssh://git@github.com/myorg/*'``).
  Patterns are ``fnmatch`` globs matched against the normalised URL (lower-case scheme and host,
  no trailing ``/``), case-sensitively.
* local (paths and ``file://``): only under a source root; by default the directory
  ``shipyard serve`` was started in and the system's temporary directory (where the demo and CI
  checkouts put repositories). Never inside the data directory, whatever the roots. Paths are
  resolved (symlinks, ``..``) before they are compared, and compared before anything checks that
  they exist, so a refusal says nothing about what is on the disk.

The home directory is deliberately not a default root: it holds the server user's own
repositories, keys and dotfiles, none of which a deployer should be able to name.

A refusal is ``SourceNotAllowed`` (HTTP 422) naming the setting that would allow it. Checked by
``Pipeline.submit`` (nothing is recorded) and again by pre-flight before the build (a deployment
submitted before the list was narrowed, then resumed).
"""

from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shipyard.build import source
from shipyard.domain import repository_urls
from shipyard.errors import SourceNotAllowed

DEFAULT_PATTERNS: tuple[str, ...] = ("https://*",)


def default_roots() -> tuple[Path, ...]:
    """The current directory and the system temporary directory (see the module docstring)."""
    return (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())


@dataclass(frozen=True)
class SourcePolicy:
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    roots: tuple[Path, ...] = field(default_factory=default_roots)
    #: Never fetched from, whatever the roots (the data directory).
    forbidden: tuple[Path, ...] = ()

    def check(self, repository: str) -> None:
        """Return if ``repository`` may be fetched; ``SourceNotAllowed`` saying which setting
        would allow it otherwise (``SourceError`` for what is no repository at all)."""
        repo = repository.strip()
        refusal = repository_urls.credentials_refusal(repo)
        if refusal is not None:
            source.normalize_repository(repo)  # raises with the credentials message
        local = _local_path(repo)
        if local is not None:
            self._check_local(repository, local)
            return
        url = source.normalize_repository(repo)  # a remote: validated, no filesystem access
        if any(fnmatch.fnmatchcase(url, p) for p in self.patterns):
            return
        raise SourceNotAllowed(
            f"repository {repository!r} is not allowed by this server: it fetches only from "
            f"{', '.join(self.patterns) or 'no remote'}. An operator can allow it with "
            f"`shipyard serve --allow-source PATTERN` (e.g. --allow-source '{_suggest(url)}')",
            repository=repository,
            setting="--allow-source",
        )

    def _check_local(self, repository: str, path: Path) -> None:
        for forbidden in self.forbidden:
            if path.is_relative_to(forbidden.resolve()):
                raise SourceNotAllowed(
                    f"repository {repository!r} is inside the server's data directory, which "
                    "is never a source",
                    repository=repository,
                )
        if not any(path.is_relative_to(root.resolve()) for root in self.roots):
            raise SourceNotAllowed(
                f"repository {repository!r} is a local path outside this server's source roots. "
                "An operator can allow it with `shipyard serve --source-root DIR`, or deploy "
                "from an https:// remote",
                repository=repository,
                setting="--source-root",
            )


def _local_path(repo: str) -> Path | None:
    """The resolved path when ``repo`` names a local repository (path or ``file://``), read the
    way ``source.normalize_repository`` reads it; None for a remote."""
    if "://" in repo:
        parts = urlsplit(repo)
        if parts.scheme.lower() != "file":
            return None
        raw = parts.path
    else:
        if "::" in repo or repo.startswith("-") or not repo:
            return None  # not a path; normalize_repository refuses it
        candidate = Path(repo).expanduser()
        if not (candidate.is_absolute() or repo.startswith((".", "~"))) and source.is_scp_like(
            repo
        ):
            return None
        raw = repo
    return Path(raw).expanduser().resolve()


def _suggest(url: str) -> str:
    if "://" in url:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}/*"
    host, _, _ = url.partition(":")
    return f"{host}:*"
