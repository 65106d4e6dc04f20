"""Image scan benchmark: the time the scan stage spends getting an image's packages out of Docker
Engine (``orchestrator/image_scan.py``: create a container, stream ``export``, keep only package
metadata, remove the container) and reading them (``rootfs.image_inventory``), beside the floor:
reading the same export stream to its end and throwing it away.

Images are ``FROM scratch`` with this machine's Python as a realistic rootfs (nothing can be
pulled here): "stdlib" is ``/usr/lib/python3.11`` plus this machine's dpkg status (733 packages)
and os-release; "stdlib + dist-packages" adds ``/usr/lib/python3/dist-packages`` (Debian's
Python packages, each with its ``.dist-info`` / ``.egg-info``). The engine is our own
(``--storage-driver=vfs``, as the tests start it). ``python bench/run.py image_scan``.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import docker

from shipyard.build.docker import DockerBuilderConfig
from shipyard.build.image_export import ImageExporter
from shipyard.orchestrator.image_scan import export_into
from shipyard.runtime.docker_engine import own_engine
from shipyard.security import rootfs

T = TypeVar("T")
PYTHON = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
RUNS = 5


def build(client: docker.DockerClient, trees: dict[str, Path], files: dict[str, Path]) -> str:
    """An image FROM scratch holding ``trees`` (image dir -> host dir) and ``files``."""
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            dockerfile = b"FROM scratch\nCOPY rootfs/ /\n"
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
            for target, source in {**trees, **files}.items():
                tar.add(source, arcname=f"rootfs/{target}", recursive=True)
        context.seek(0)
        image, _ = client.images.build(fileobj=context, custom_context=True, rm=True)
    return str(image.id)


def timed(fn: Callable[[], T], runs: int = RUNS) -> tuple[list[float], list[float], T]:
    """Wall-clock and this process's CPU seconds per run, and the last result. The CPU time is
    what the scan costs us (tar parsing, writes, inventory); the wall time adds the engine's
    work and, on a shared machine, everyone else's."""
    wall: list[float] = []
    cpu: list[float] = []
    result: Any = None
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu, result


def fmt(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"{statistics.median(ms):.0f} ms (min {min(ms):.0f}, max {max(ms):.0f})"


def measure(exporter: ImageExporter, client: docker.DockerClient, image: str) -> dict[str, Any]:
    size = client.images.get(image).attrs["Size"]

    def create_and_remove() -> None:
        # What the engine does before the stream starts (vfs copies the image into the new
        # container's layer; overlay2 would not) and after it ends.
        container = client.containers.create(image, command=["/x"], network_mode="none")
        container.remove(force=True)

    def drain() -> int:
        def consume(stream: IO[bytes]) -> int:
            total = 0
            while chunk := stream.read(1 << 20):
                total += len(chunk)
            return total

        return exporter.export(image, consume)

    def export_and_inventory() -> tuple[rootfs.ExtractReport, int, dict[str, int]]:
        with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
            report = export_into(exporter, image, Path(tmp))
            inv = rootfs.image_inventory(Path(tmp), image)
        kinds: dict[str, int] = {}
        for p in inv.packages:
            kinds[p.ecosystem] = kinds.get(p.ecosystem, 0) + 1
        return report, len(inv.packages), kinds

    create, _, _ = timed(create_and_remove)
    floor, floor_cpu, _ = timed(drain)
    scan, scan_cpu, (report, packages, kinds) = timed(export_and_inventory)
    return {
        "size": size,
        "create": create,
        "floor": floor,
        "floor_cpu": floor_cpu,
        "scan": scan,
        "scan_cpu": scan_cpu,
        "report": report,
        "packages": packages,
        "kinds": kinds,
    }


def main() -> str:
    images = {
        "stdlib": (
            {f"usr/lib/{PYTHON.name}": PYTHON},
            {
                "var/lib/dpkg/status": Path("/var/lib/dpkg/status"),
                # Debian's etc/os-release is a link to this file; links are never followed,
                # the inventory reads usr/lib/os-release instead (os-release(5)'s fallback).
                "etc/os-release": Path("/etc/os-release"),
                "usr/lib/os-release": Path("/usr/lib/os-release"),
            },
        ),
    }
    if DIST_PACKAGES.is_dir():
        images["stdlib + dist-packages"] = (
            {**images["stdlib"][0], "usr/lib/python3/dist-packages": DIST_PACKAGES},
            images["stdlib"][1],
        )
    rows: list[str] = []
    with own_engine() as address:
        client = docker.DockerClient(base_url=address, timeout=600)
        exporter = ImageExporter(DockerBuilderConfig(base_url=address))
        try:
            for name, (trees, files) in images.items():
                image = build(client, trees, files)
                m = measure(exporter, client, image)
                report: rootfs.ExtractReport = m["report"]
                kinds = ", ".join(f"{n} {k}" for k, n in sorted(m["kinds"].items()))
                rows.append(
                    f"| {name} | {m['size'] / 1e6:.0f} MB, {report.members} entries | "
                    f"{report.files} files, {report.bytes / 1e3:.0f} kB | {m['packages']} "
                    f"({kinds}) | {fmt(m['create'])} | {fmt(m['floor'])} | {fmt(m['scan'])} | "
                    f"{fmt(m['floor_cpu'])} | {fmt(m['scan_cpu'])} |"
                )
        finally:
            client.close()
    return "\n".join(
        [
            "## Image scan: export and inventory",
            "",
            "What the scan stage adds for an `oci-image` artifact before the gate's SBOM/scan/sign "
            "(see Security scan for those): a container created (never started) from the image, "
            "its `export` tar stream read once, only package metadata written to a temporary "
            "directory, the container removed, then the inventory of those files. The floor is "
            "the same export stream read to its end and discarded. Images `FROM scratch` with "
            "this machine's Python as the rootfs, Docker Engine with the vfs storage driver.",
            "",
            f"Medians of {RUNS} runs (min, max). Wall time includes the engine's work and, on "
            "this shared 2-core machine, other engineers' load (load average "
            f"{os.getloadavg()[0]:.1f} at the end); CPU time is this process's own.",
            "",
            "| image | size | extracted | packages | container create + remove (engine) | "
            "export stream drained (floor), wall | export + extract + inventory, wall | "
            "floor, our CPU | export + extract + inventory, our CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            "Reading: the wall time is the engine's (creating the container copies the image "
            "under vfs; the drained stream alone costs as much as the whole scan), and what the "
            "scan adds in this process is the last column: under a second of CPU for a 94 MB "
            "image. The extract keeps well under 1 MB of the image.",
            "",
        ]
    )


if __name__ == "__main__":
    print(main())
