"""An image's files for the security gate: exported from the engine into a private temporary
directory for the length of one scan.

``exported_rootfs`` runs ``ImageExporter.export`` (build layer: it talks to Docker Engine) with
``rootfs.extract_scan_files`` (security layer: it reads the hostile tar stream) as its consumer,
in one worker thread, so the image streams from the engine straight into the few files the
scanner reads; the directory is removed when the scan is over, whatever happened. The
orchestrator joins the two here because build and security are sibling layers that do not
import each other. Called by the scan stage (``preflight.scan``) for ``oci-image`` artifacts.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shipyard.build.image_export import ImageExporter
from shipyard.domain.clock import to_thread
from shipyard.security import rootfs


@dataclass(frozen=True)
class ExportedRootfs:
    """Where the image's scan files are, and what extracting them found."""

    path: Path
    report: rootfs.ExtractReport


def export_into(
    exporter: ImageExporter,
    image: str,
    dest: Path,
    limits: rootfs.ExtractLimits | None = None,
) -> rootfs.ExtractReport:
    """Blocking: stream ``image`` out of the engine and extract its scan files into ``dest``."""

    def consume(stream: IO[bytes]) -> rootfs.ExtractReport:
        return rootfs.extract_scan_files(stream, dest, limits)

    return exporter.export(image, consume)


@asynccontextmanager
async def exported_rootfs(
    exporter: ImageExporter,
    image: str,
    *,
    scratch: Path | None = None,
    limits: rootfs.ExtractLimits | None = None,
) -> AsyncIterator[ExportedRootfs]:
    """The scan files of ``image`` (an image ID: the digest the gate signs) in a temporary
    directory (under ``scratch``, else the system's), removed on exit."""
    tmp = Path(await to_thread(tempfile.mkdtemp, prefix="shipyard-scan-", dir=scratch))
    try:
        report = await to_thread(export_into, exporter, image, tmp, limits)
        yield ExportedRootfs(tmp, report)
    finally:
        await to_thread(shutil.rmtree, tmp, True)
