"""The manifest's entry-point keys (``[service] hosts``, ``port``, ``https_redirect``,
``hsts_max_age``) and the ``EntrySpec`` that carries them to a runtime: what is accepted, what is
refused and in which words."""

from __future__ import annotations

from typing import Any

import pytest

from shipyard.domain.manifest import parse_manifest
from shipyard.errors import ManifestError
from shipyard.runtime.base import EntrySpec, RevisionSpec


def manifest(service_lines: str) -> str:
    return f'[service]\nname = "notes"\n{service_lines}\n[run]\ncommand = "python3 app.py"\n'


def test_defaults_claim_nothing() -> None:
    service = parse_manifest(manifest("")).service
    assert (service.hosts, service.port, service.https_redirect, service.hsts_max_age) == (
        [],
        None,
        False,
        0,
    )


def test_hosts_are_normalised_and_deduplicated() -> None:
    service = parse_manifest(
        manifest('hosts = ["Notes.Example.com", "notes.example.com.", "example.com/api/"]')
    ).service
    assert service.hosts == ["notes.example.com", "example.com/api"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param('hosts = ["notes example"]', "is not a DNS name", id="space"),
        pytest.param('hosts = ["a.com:8443"]', "has a port", id="port-in-host"),
        pytest.param('hosts = ["*.com"]', "two labels after", id="wildcard-tld"),
        pytest.param("port = 0", "service.port", id="port-zero"),
        pytest.param("port = 70000", "service.port", id="port-too-big"),
        pytest.param("hsts_max_age = -1", "service.hsts_max_age", id="negative-hsts"),
        pytest.param('https_redirect = "yes"', "service.https_redirect", id="redirect-not-bool"),
        pytest.param('port = "8080"', "service.port", id="port-not-int"),
        pytest.param(
            "hosts = [" + ", ".join(f'"h{i}.test"' for i in range(65)) + "]",
            "service.hosts",
            id="too-many",
        ),
    ],
)
def test_bad_entry_keys_are_refused_naming_the_field(line: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(manifest(line))


def test_a_revision_spec_carries_the_entry_through_json() -> None:
    spec = RevisionSpec(
        service="notes",
        revision="r1",
        artifact_digest="sha256:" + "0" * 64,
        artifact_location="/x",
        argv=["app"],
        entry=EntrySpec(("notes.example.com",), 8080, True, 60),
    )
    assert RevisionSpec.from_dict(spec.to_dict()) == spec
    older = RevisionSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "entry"})
    assert older.entry is None  # a spec from before entry specs: the runtime keeps what it has
    assert "entry" not in older.to_dict()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param({"hosts": ["bad host"]}, "not a DNS name", id="host"),
        pytest.param({"hosts": "notes.test"}, "must be a list", id="hosts-not-list"),
        pytest.param({"port": True}, "entry port", id="port-bool"),
        pytest.param({"port": 0}, "entry port", id="port-zero"),
        pytest.param({"https_redirect": 1}, "https_redirect", id="redirect-int"),
        pytest.param({"hsts_max_age": 10**9}, "hsts_max_age", id="hsts-huge"),
        pytest.param({"tls": True}, "unknown entry field", id="unknown"),
    ],
)
def test_an_entry_spec_refuses_what_the_manifest_would(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EntrySpec.from_dict(entry)
