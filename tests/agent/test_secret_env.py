"""App secrets on a real agent (its API, its sandbox, a real replica process): the replica's
environment has ``secret_env`` (over ``[run] env``), its secret files are in a private
directory (0700, files 0400, the replica's own uid) named by ``SHIPYARD_SECRETS_DIR`` and gone
when it stops, a value the app prints is masked in its log, and nothing of them is in the
agent's own files but ``state.json`` (0600)."""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shipyard.agent import secret_files
from shipyard.errors import RevisionStartFailed
from shipyard.runtime.base import RevisionSpec
from shipyard.sandbox import Sandbox, SandboxPolicy
from tests.agent.helpers import eventually, get_info, make_artifact, running_agent, spec_for

VALUE = "db-pass-0a1b2c3d4e5f"
KEY_BODY = "c2VjcmV0LWtleS1ib2R5LTk4NzY1"
KEY = f"-----BEGIN KEY-----\n{KEY_BODY}\n-----END KEY-----\n"


def with_secrets(spec: RevisionSpec) -> RevisionSpec:
    return dataclasses.replace(
        spec,
        secret_env={"DB_PASSWORD": VALUE},
        secret_files={"tls.key": KEY},
    )


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


async def test_a_replica_gets_its_secrets_and_nothing_else_keeps_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    artifact = make_artifact(tmp_path, "v1")
    spec = with_secrets(
        spec_for(
            artifact,
            service="secretive",
            # [run] env may not win over a secret, nor name the secrets' directory itself.
            env={
                "DB_PASSWORD": "from-run-env",
                "SHIPYARD_SECRETS_DIR": "/elsewhere",
                "PRINT_VAR": "DB_PASSWORD",
            },
        )
    )
    assert VALUE not in repr(spec) and KEY_BODY not in repr(spec)
    async with running_agent(data) as (agent, client):
        r = await client.put("/v1/services/secretive/revisions/v1", json=spec.to_dict())
        assert r.status_code == 200, r.text
        [started] = r.json()["replicas"]
        replica = agent.supervisor.replicas[started["replica_id"]]
        info: dict[str, Any] = await eventually(
            lambda: get_info(started["port"]), what="the app answering"
        )
        environ = info["environ"]
        assert environ["DB_PASSWORD"] == VALUE
        directory = str(replica.run_dir / secret_files.DIR_NAME)
        assert environ["SHIPYARD_SECRETS_DIR"] == directory
        assert info["secret_files"] == {"tls.key": {"mode": 0o400, "uid": info["uid"], "text": KEY}}
        assert info["secrets_dir"] == {"mode": 0o700, "uid": info["uid"]}
        if agent.supervisor.sandbox.enabled and os.geteuid() == 0:
            assert info["uid"] != 0  # the service's own uid, not the agent's
        # The app printed its secret: the replica's log has it masked.
        log_dir = Path(started["log_path"])
        await eventually(lambda: _logged(log_dir, "my value is"), what="the app's line logged")
        assert files_holding(log_dir, VALUE) == []
        # state.json holds the spec (to restart replicas), values included: private.
        state = agent.dir / "state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        stop = await client.post(
            "/v1/services/secretive/stop",
            json={"replica_ids": [started["replica_id"]], "drain_timeout": 1},
        )
        assert stop.status_code == 200, stop.text
        assert not Path(directory).exists()
        # Nothing of either value anywhere in the agent's files now but state.json.
        for text in (VALUE, KEY_BODY):
            assert [p for p in files_holding(data, text) if p != state] == []


async def test_a_secret_file_name_with_a_path_is_refused(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path, "v1")
    spec = dataclasses.replace(
        spec_for(artifact, service="secretive"), secret_files={"../escape": VALUE}
    )
    sandbox = Sandbox(SandboxPolicy(data_dir=tmp_path / "sandbox", insecure=True))
    with pytest.raises(RevisionStartFailed, match="not a plain file name"):
        secret_files.write(tmp_path / "secrets", spec, sandbox)
    assert not (tmp_path / "escape").exists()
    async with running_agent(tmp_path / "data") as (_agent, client):
        r = await client.put("/v1/services/secretive/revisions/v1", json=spec.to_dict())
        assert r.status_code >= 400
        assert VALUE not in r.text
    assert not (tmp_path / "data" / "run" / "escape").exists()


def test_the_container_archive_is_private_and_owned() -> None:
    spec = RevisionSpec(
        service="x",
        revision="v1",
        artifact_digest="sha256:" + "0" * 64,
        artifact_location="img",
        argv=[],
        artifact_kind="oci-image",
        secret_files={"tls.key": KEY},
    )
    owner = secret_files.numeric_owner("65534:65534")
    assert owner == (65534, 65534)
    blob = secret_files.archive(spec, owner)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = {m.name: (m.mode, m.uid, m.gid, m.isdir()) for m in tar.getmembers()}
    assert members == {
        "run/shipyard-secrets": (0o700, 65534, 65534, True),
        "run/shipyard-secrets/tls.key": (0o400, 65534, 65534, False),
    }
    # What the agent keeps in state.json and reads back to restart replicas.
    assert RevisionSpec.from_dict(spec.to_dict()).secret_files == {"tls.key": KEY}
    assert secret_files.numeric_owner("1000") == (1000, 1000)
    assert secret_files.numeric_owner("app") is None
    passwd = "root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/home/app:/bin/sh\n"
    assert secret_files.passwd_entry(passwd, "app") == (1001, 1002)
    assert secret_files.passwd_entry(passwd, "nobody") is None


async def _logged(log_dir: Path, text: str) -> bool:
    return bool(files_holding(log_dir, text))
