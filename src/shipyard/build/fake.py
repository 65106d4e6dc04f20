"""A ``Builder`` that builds nothing: returns a ready artifact for the commit it is asked for.

For orchestrator and API tests that exercise the pipeline without git or subprocesses. Commits
listed in ``fail`` raise ``BuildFailed`` like a failing build command would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from shipyard.build.base import Artifact, BuildRequest
from shipyard.build.digest import digest_tree
from shipyard.domain.manifest import Manifest, parse_manifest
from shipyard.errors import BuildFailed

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


class FakeBuilder:
    kind = "fake"

    def __init__(
        self,
        manifest: Manifest | None = None,
        duration_ms: int = 1234,
        root: Path | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        """With ``root``, each build materialises a real artifact directory (``files`` plus a
        ``commit.txt``) under it and digests it like the real builders do, so the security gate
        and the deploy-time digest check work on it."""
        self.manifest = manifest or parse_manifest(DEFAULT_MANIFEST)
        self.duration_ms = duration_ms
        self.root = root
        self.files = dict(files or {"app.py": "print('hello')\n"})
        self.fail: set[str] = set()
        self.built: list[str] = []

    async def build(self, request: BuildRequest) -> Artifact:
        commit = request.source.commit
        if commit in self.fail:
            if request.log_sink:
                request.log_sink("error: tests failed")
            raise BuildFailed(f"build command exited with 1 for {commit}", exit_code=1)
        self.built.append(commit)
        full = (commit * 10)[:40]
        digest = "sha256:" + hashlib.sha256(full.encode()).hexdigest()
        location = f"/artifacts/{digest[7:19]}"
        if self.root is not None:
            tree = self.root / full
            for name, text in {**self.files, "commit.txt": full}.items():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                (tree / name).write_text(text)
            digest, location = digest_tree(tree), str(tree)
        return Artifact(
            digest=digest,
            kind="directory",
            location=location,
            commit=full,
            manifest=self.manifest,
            builder=self.kind,
            duration_ms=self.duration_ms,
        )
