"""CycloneDX SBOM of an artifact: its Python distributions (``pkg:pypi/...``) and OS packages
(``pkg:deb/debian/...``, ``pkg:deb/ubuntu/...``, ``pkg:apk/alpine/...``), with the artifact
itself (identified by its ``sha256`` digest) as the metadata component. Written by the gate next
to the signed provenance; the provenance names the SBOM file's digest, so the two travel together.

Built with cyclonedx-python-lib; JSON, CycloneDX spec 1.6.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output import make_outputter
from cyclonedx.schema import OutputFormat, SchemaVersion
from packageurl import PackageURL

from shipyard.security.inventory import (
    ALPINE,
    DEBIAN,
    PYPI,
    UBUNTU_ECOSYSTEM,
    Inventory,
    Package,
)

SCHEMA_VERSION = SchemaVersion.V1_6


@dataclass(frozen=True)
class SbomSubject:
    """What the SBOM describes: the built artifact."""

    digest: str  # sha256:<hex>
    name: str
    kind: str = "directory"  # directory | oci-image
    commit: str | None = None
    builder: str | None = None


#: purl type and default namespace of each OS ecosystem.
_OS_PURL = {
    DEBIAN: ("deb", "debian"),
    UBUNTU_ECOSYSTEM: ("deb", "ubuntu"),
    ALPINE: ("apk", "alpine"),
}


def package_url(package: Package) -> PackageURL:
    """``pkg:pypi/NAME@V``; ``pkg:deb/debian/NAME@V?arch=A&distro=debian-12`` (``ubuntu``
    likewise); ``pkg:apk/alpine/NAME@V?arch=A&distro=alpine-3.19.1``. The namespace is the
    image's os-release ID when it states one."""
    if package.ecosystem == PYPI:
        return PackageURL(type="pypi", name=package.name, version=package.version)
    purl_type, default_namespace = _OS_PURL.get(package.ecosystem, ("generic", None))
    namespace = package.distro or default_namespace
    qualifiers: dict[str, str] = {}
    if package.arch:
        qualifiers["arch"] = package.arch
    if package.release and namespace:
        qualifiers["distro"] = f"{namespace}-{package.release}"
    return PackageURL(
        type=purl_type,
        namespace=namespace,
        name=package.name,
        version=package.version,
        qualifiers=qualifiers or None,
    )


def _component(package: Package) -> Component:
    purl = package_url(package)
    props = []
    if package.source_name and package.source_name != package.name:
        kind = "apk" if package.ecosystem == ALPINE else "deb"
        props.append(Property(name=f"shipyard:{kind}:source", value=package.source_name))
    return Component(
        type=ComponentType.LIBRARY if package.ecosystem == PYPI else ComponentType.APPLICATION,
        name=package.name,
        version=package.version,
        purl=purl,
        bom_ref=purl.to_string(),
        properties=props or None,
    )


def build_bom(inventory: Inventory, subject: SbomSubject) -> Bom:
    algorithm, _, hexdigest = subject.digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"artifact digest must be sha256:<64 hex>, got {subject.digest!r}")
    props = [Property(name="shipyard:artifact:kind", value=subject.kind)]
    if subject.commit:
        props.append(Property(name="shipyard:source:commit", value=subject.commit))
    if subject.builder:
        props.append(Property(name="shipyard:builder", value=subject.builder))
    root = Component(
        type=ComponentType.CONTAINER if subject.kind == "oci-image" else ComponentType.APPLICATION,
        name=subject.name,
        version=subject.digest,
        bom_ref=subject.digest,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)],
        properties=props,
    )
    bom = Bom()
    bom.metadata.component = root
    bom.metadata.tools.components.add(Component(type=ComponentType.APPLICATION, name="shipyard"))
    components = [_component(p) for p in inventory.packages]
    for c in components:
        bom.components.add(c)
    # Every package is a direct part of the artifact; saying so keeps the graph complete.
    bom.register_dependency(root, components)
    return bom


def to_json(bom: Bom) -> str:
    return make_outputter(bom, OutputFormat.JSON, SCHEMA_VERSION).output_as_string(indent=2)


def write_sbom(inventory: Inventory, subject: SbomSubject, directory: Path) -> Path:
    """Write ``<directory>/<digest hex>.cdx.json`` atomically and return its path."""
    text = to_json(build_bom(inventory, subject))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{subject.digest.partition(':')[2]}.cdx.json"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file (the SBOM, as named in the provenance)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
