"""The agent starts only what the control plane signed: through its API (``httpx.ASGITransport``)
with real replicas, each refusal names the check that failed and changes nothing; a state file
left by a previous agent is verified again before anything in it starts."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.agent.server import Agent
from shipyard.agent.verify import ArtifactVerifier
from shipyard.errors import ArtifactVerificationFailed
from shipyard.runtime.base import RevisionSpec
from shipyard.security import signing
from tests.agent.helpers import (
    TRUSTED_KEY,
    agent_client,
    app_host_pid,
    eventually,
    get_info,
    make_artifact,
    running_agent,
    sign,
    spec_for,
)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with running_agent(tmp_path / "data") as pair:
        yield pair


async def _put(client: httpx.AsyncClient, spec: RevisionSpec) -> httpx.Response:
    return await client.put(
        f"/v1/services/{spec.service}/revisions/{spec.revision}", json=spec.to_dict()
    )


def _tampered_payload(spec: RevisionSpec) -> RevisionSpec:
    """The envelope's signed statement rewritten after signing (the signature no longer fits)."""
    assert spec.provenance is not None
    envelope = dict(spec.provenance)
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["buildDefinition"]["externalParameters"]["buildCommand"] = "evil"
    envelope["payload"] = base64.b64encode(signing.statement_bytes(statement)).decode()
    return replace(spec, provenance=envelope)


def _other_digest(spec: RevisionSpec, tmp: Path) -> RevisionSpec:
    """Correctly signed, but for another artifact's digest than the one at the location."""
    other = sign(replace(spec, artifact_location=str(make_artifact(tmp, "other"))))
    return replace(spec, provenance=other.provenance)


@pytest.mark.parametrize(
    ("make_bad", "check", "reason", "says"),
    [
        pytest.param(
            lambda s, _: replace(s, provenance=None),
            "signature",
            "unsigned",
            "unsigned",
            id="unsigned",
        ),
        pytest.param(
            lambda s, _: sign(s, signing.Ed25519Signer.generate()),
            "signature",
            "foreign_key",
            "foreign key",
            id="foreign-key",
        ),
        pytest.param(
            lambda s, _: _tampered_payload(s),
            "signature",
            "bad_signature",
            "bad signature",
            id="tampered-statement",
        ),
        pytest.param(
            _other_digest,
            "signature",
            "digest_mismatch",
            "signed provenance is for",
            id="signed-for-another-digest",
        ),
    ],
)
async def test_a_start_without_a_valid_signature_is_refused_and_changes_nothing(
    agent: tuple[Agent, httpx.AsyncClient],
    tmp_path: Path,
    make_bad: Any,
    check: str,
    reason: str,
    says: str,
) -> None:
    a, client = agent
    good = spec_for(make_artifact(tmp_path, "v1"))
    r = await _put(client, make_bad(good, tmp_path))
    assert r.status_code == 422
    problem = r.json()
    assert problem["code"] == "artifact_verification_failed"
    assert (problem["check"], problem["reason"]) == (check, reason)
    assert says in problem["message"] and "svc/v1" in problem["message"]
    assert a.supervisor.replicas == {} and a.routes == {}  # not even the service's listener
    assert not (a.dir / "state.json").exists()


async def test_an_artifact_changed_after_signing_is_refused(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    a, client = agent
    artifact = make_artifact(tmp_path, "v1")
    spec = spec_for(artifact)
    artifact.chmod(0o755)
    (artifact / "helper.py").chmod(0o644)
    (artifact / "helper.py").write_text("VALUE = 'changed'\n")
    r = await _put(client, spec)
    assert r.status_code == 422
    problem = r.json()
    assert (problem["check"], problem["reason"]) == ("digest", "content_mismatch")
    assert problem["actual"] != spec.artifact_digest
    assert "digest check failed" in problem["message"]
    assert a.supervisor.replicas == {}


async def test_a_missing_artifact_is_refused_as_unreadable(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    _, client = agent
    spec = replace(spec_for(make_artifact(tmp_path, "v1")), artifact_location=str(tmp_path / "no"))
    r = await _put(client, spec)
    assert r.status_code == 422
    assert (r.json()["check"], r.json()["reason"]) == ("digest", "unreadable")


async def test_a_signed_unchanged_artifact_starts(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    a, client = agent
    r = await _put(client, spec_for(make_artifact(tmp_path, "v1")))
    assert r.status_code == 200, r.text
    [replica] = r.json()["replicas"]
    await eventually(lambda: get_info(replica["port"]), what="the replica answering")
    assert app_host_pid(replica["pid"]) > 0  # the app runs in that replica's process group
    saved = json.loads((a.dir / "state.json").read_text())["revisions"][0]["spec"]
    assert saved["provenance"]["signatures"]  # what a restarted agent verifies again


async def test_a_restored_revision_is_verified_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Agent(data, "local", trusted_key=TRUSTED_KEY)
    artifacts = {v: make_artifact(tmp_path, v) for v in ("v1", "v2")}
    async with agent_client(first) as client:
        for v, path in artifacts.items():
            r = await _put(client, spec_for(path, v))
            assert r.status_code == 200, r.text
    left_behind = (first.dir / "state.json").read_text()  # what a killed agent leaves
    await first.close()
    (first.dir / "state.json").write_text(left_behind)
    # While no agent ran, v2's artifact was changed.
    artifacts["v2"].chmod(0o755)
    (artifacts["v2"] / "extra.py").write_text("print('not built')\n")

    second = Agent(data, "local", trusted_key=TRUSTED_KEY)
    try:
        await second.restore()
        assert {r.spec.revision for r in second.supervisor.replicas.values()} == {"v1"}
        saved = json.loads((second.dir / "state.json").read_text())
        assert [rev["spec"]["revision"] for rev in saved["revisions"]] == ["v1"]
    finally:
        await second.close()


def test_the_key_is_read_when_first_needed_then_pinned(tmp_path: Path) -> None:
    pub = tmp_path / "keys" / "signing.pub"
    verifier = ArtifactVerifier(pub)
    spec = spec_for(make_artifact(tmp_path, "v1"))
    with pytest.raises(ArtifactVerificationFailed, match="no trusted signing key") as missing:
        verifier.verify(spec)
    assert missing.value.detail["reason"] == "no_trusted_key"
    pub.parent.mkdir()
    pub.write_text(TRUSTED_KEY)
    verifier.verify(spec)
    pub.write_text(signing.Ed25519Signer.generate().public_key_pem())  # replaced later
    verifier.verify(spec)  # still the key it read first


def test_the_agent_refuses_the_private_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="private signing key"):
        Agent(tmp_path, "local", trusted_key=tmp_path / "keys" / signing.KEY_FILE)
