"""Test images made of files we choose: ``FROM scratch`` plus a root filesystem assembled in a tar
build context (nothing can be pulled here). Used by the image export and image scan tests."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping

import docker

LANGCHAIN_METADATA = "Metadata-Version: 2.1\nName: langchain\nVersion: 0.0.170\n"
#: langchain 0.0.170: PYSEC-2023-151 & co in the real PyPA database, CVSS 9.8 (critical).
LANGCHAIN_DIST_INFO = "usr/lib/python3/site-packages/langchain-0.0.170.dist-info/METADATA"

DPKG_STATUS = """\
Package: libssl3
Status: install ok installed
Architecture: amd64
Source: openssl
Version: 3.0.11-1~deb12u2
Description: Secure Sockets Layer toolkit - shared libraries
 This package is part of the OpenSSL project's implementation.

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1

Package: oldlib
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
"""

APK_INSTALLED = """\
P:musl
V:1.2.4-r2
A:x86_64
o:musl

P:libcrypto3
V:3.1.4-r5
A:x86_64
o:openssl
"""

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'

#: A rootfs with all three kinds of packages (dpkg, apk, a Python distribution).
MIXED_ROOTFS: dict[str, bytes] = {
    "var/lib/dpkg/status": DPKG_STATUS.encode(),
    "lib/apk/db/installed": APK_INSTALLED.encode(),
    "etc/os-release": OS_RELEASE.encode(),
    LANGCHAIN_DIST_INFO: LANGCHAIN_METADATA.encode(),
    "app/main.py": b"print('hello')\n",
}


def build_image(
    client: docker.DockerClient,
    files: Mapping[str, bytes],
    *,
    symlinks: Mapping[str, str] | None = None,
    tag: str | None = None,
) -> str:
    """An image ``FROM scratch`` holding ``files`` (and ``symlinks``: path -> target) at the
    given paths; its image ID."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("Dockerfile", b"FROM scratch\nCOPY rootfs/ /\n")
        for path, data in files.items():
            add(f"rootfs/{path}", data)
        for path, target in (symlinks or {}).items():
            info = tarfile.TarInfo(f"rootfs/{path}")
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    buffer.seek(0)
    image, _ = client.images.build(fileobj=buffer, custom_context=True, rm=True, tag=tag)
    return str(image.id)
