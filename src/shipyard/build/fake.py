"""``FakeBuilder``: the ``Builder`` contract without git or subprocesses, for the orchestrator's,
the API's and the build registry's tests.

It honours what callers rely on: the same source always yields the same ``sha256:`` digest (a
rebuild is an artifact cache hit, unless the request says ``no_cache``), the artifact names the
full commit it was built from, a failure is a ``BuildFailed`` like the local builder's (commits
listed in ``fail``: exit code 1, the log tail in its detail; or the error in ``fail_with``), and
every request is recorded. With ``root`` it materialises a real artifact directory digested like
the real builders do, so the security gate and the deploy-time digest check work on it; without,
its ``location`` names no directory (the fake runtime never looks). It does not check that the
commit exists, nor share an artifact between two commits of the same tree as the local builder
does; use ``LocalBuilder`` with a real repository for that. tests/contract/test_builder_contract.py
runs one suite against both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from shipyard.build.base import Artifact, BuildRequest, CacheReport
from shipyard.build.digest import digest_tree
from shipyard.domain.manifest import Manifest, parse_manifest
from shipyard.errors import BuildFailed, ShipyardError

DEFAULT_MANIFEST = """
[service]
name = "hello"
[run]
command = "python3 app.py"
[health]
endpoint = "/health"
interval_seconds = 1
success_threshold = 2
failure_threshold = 3
"""

#: The last line a failing fake build prints.
FAILURE_LINE = "error: tests failed"


class FakeBuilder:
    def __init__(
        self,
        manifest: Manifest | None = None,
        duration_ms: int = 1234,
        root: Path | None = None,
        files: Mapping[str, str] | None = None,
        kind: str = "fake",
        artifact_kind: Literal["directory", "oci-image"] = "directory",
    ) -> None:
        self.kind = kind
        #: What it builds: a directory, or (``oci-image``) an image named like the Docker
        #: builder's tags, whose digest stands for the image ID.
        self.artifact_kind = artifact_kind
        self.manifest = manifest or parse_manifest(DEFAULT_MANIFEST)
        self.duration_ms = duration_ms
        self.root = root
        self.files = dict(files or {"app.py": "print('hello')\n"})
        #: Commits whose build fails like a failing build command.
        self.fail: set[str] = set()
        #: Raised by the next build (then cleared), e.g. ``BuildFailed("exit 1")``.
        self.fail_with: ShipyardError | None = None
        self.requests: list[BuildRequest] = []
        self.built: list[str] = []
        self._digests: set[str] = set()

    async def build(self, request: BuildRequest) -> Artifact:
        self.requests.append(request)
        commit = request.source.commit
        if self.fail_with is not None:
            err, self.fail_with = self.fail_with, None
            raise err
        if commit in self.fail:
            # What LocalBuilder raises for a build command that printed this line and exited 1
            # (tests/contract/test_builder_contract.py holds the two to it).
            if request.log_sink:
                request.log_sink(FAILURE_LINE)
            raise BuildFailed(
                f"build command exited with code 1; last output:\n{FAILURE_LINE}",
                exit_code=1,
                log_tail=[FAILURE_LINE],
            )
        self.built.append(commit)
        full = (commit * 10)[:40]
        digest = (
            "sha256:" + hashlib.sha256(f"{request.source.repository}@{full}".encode()).hexdigest()
        )
        location = f"/artifacts/{digest[7:19]}"
        if self.artifact_kind == "oci-image":
            location = f"shipyard/{self.manifest.service.name}:{full[:12]}"
        elif self.root is not None:
            tree = self.root / full
            for name, text in {**self.files, "commit.txt": full}.items():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                (tree / name).write_text(text)
            digest, location = digest_tree(tree), str(tree)
        hit = digest in self._digests and not request.no_cache
        self._digests.add(digest)
        return Artifact(
            digest=digest,
            kind=self.artifact_kind,
            location=location,
            commit=full,
            manifest=self.manifest,
            builder=self.kind,
            duration_ms=0 if hit else self.duration_ms,
            cache=CacheReport(artifact_hit=hit, no_cache=request.no_cache),
        )
