"""CycloneDX SBOM of an artifact: Python and Debian components with purls, the artifact digest
as the metadata component, a complete dependency graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shipyard.security import inventory, sbom

from .conftest import artifact_tree, debian_root

DIGEST = "sha256:" + "ab" * 32


def write(tmp_path: Path, *, kind: str = "directory") -> dict[str, Any]:
    root = artifact_tree(
        debian_root(tmp_path / "artifact"), {"Foo_Bar": "1.0", "requests": "2.31.0+local"}
    )
    subject = sbom.SbomSubject(
        digest=DIGEST, name="hello", kind=kind, commit="c0ffee", builder="local"
    )
    path = sbom.write_sbom(inventory.from_tree(root), subject, tmp_path / "sboms")
    assert path == tmp_path / "sboms" / f"{'ab' * 32}.cdx.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_sbom_components_and_purls(tmp_path: Path) -> None:
    data = write(tmp_path)
    assert data["bomFormat"] == "CycloneDX"
    assert data["specVersion"] == "1.6"
    purls = {c["purl"] for c in data["components"]}
    assert purls == {
        "pkg:pypi/foo-bar@1.0",
        "pkg:pypi/requests@2.31.0%2Blocal",
        "pkg:deb/debian/libssl3@3.0.11-1~deb12u2?arch=amd64&distro=debian-12",
        "pkg:deb/debian/openssl@3.0.11-1~deb12u2?arch=amd64&distro=debian-12",
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4%2Bb1?arch=amd64&distro=debian-12",
    }
    libssl = next(c for c in data["components"] if c["name"] == "libssl3")
    assert {"name": "shipyard:deb:source", "value": "openssl"} in libssl["properties"]


@pytest.mark.parametrize(
    ("kind", "component_type"), [("directory", "application"), ("oci-image", "container")]
)
def test_sbom_metadata_component_is_the_artifact(
    tmp_path: Path, kind: str, component_type: str
) -> None:
    data = write(tmp_path, kind=kind)
    root = data["metadata"]["component"]
    assert root["bom-ref"] == DIGEST
    assert root["type"] == component_type
    assert root["hashes"] == [{"alg": "SHA-256", "content": "ab" * 32}]
    props = {p["name"]: p["value"] for p in root["properties"]}
    assert props == {
        "shipyard:artifact:kind": kind,
        "shipyard:source:commit": "c0ffee",
        "shipyard:builder": "local",
    }
    deps = {d["ref"]: set(d.get("dependsOn", [])) for d in data["dependencies"]}
    assert deps[DIGEST] == {c["bom-ref"] for c in data["components"]}


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 64, "ab" * 32])
def test_bad_digest_is_refused(digest: str) -> None:
    inv = inventory.Inventory("x", "tree")
    with pytest.raises(ValueError, match="sha256:<64 hex>"):
        sbom.build_bom(inv, sbom.SbomSubject(digest=digest, name="x"))


def test_file_digest(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert (
        sbom.file_digest(f)
        == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
