"""Issue 9's check: a repository whose build and whose app try to read the data directory, the
keys, the agent token and the server's environment, and to write the database and the audit
anchor. Every attempt fails, the deployment still works, and nothing secret appears in any log
or API answer; the audit trail still verifies."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.build.helpers import GitRepo
from tests.e2e.support import Server

HOSTILE = Path(__file__).parent / "hostile"
SECRET_FILES = [
    "keys/jwt.key",
    "keys/signing.key",
    "keys/checkpoint.key",
    "agents/local/agent.token",
]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-service uids need root")


def _forms(secret: bytes) -> list[str]:
    """How a secret could show up in text (checked independently of the product's masker)."""
    forms = [secret.hex(), base64.b64encode(secret).decode().rstrip("=")]
    text = secret.decode("utf-8", errors="ignore")
    forms += [line for line in text.splitlines() if len(line) >= 16 and "-----" not in line]
    return forms


def test_hostile_build_and_app_reach_nothing_and_leak_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_secret = "SHIPYARD_E2E_SECRET=" + os.urandom(12).hex()
    name, _, value = env_secret.partition("=")
    monkeypatch.setenv(name, value)  # the server's own environment holds it
    data = tmp_path / "data"
    witness = tmp_path / "witness" / "checkpoint"  # outside the data directory
    witness.parent.mkdir()
    server = Server(data, "--witness", str(witness), "--checkpoint-interval", "1").start()
    try:
        repo = GitRepo(tmp_path / "hostile-repo")
        for f in ("probe.py", "app.py", "shipyard.toml"):
            shutil.copy(HOSTILE / f, repo.path / f)
        targets = {"data_dir": str(data), "secret_files": SECRET_FILES, "env_secret": value}
        repo.write("targets.json", json.dumps(targets))
        commit = repo.commit("hostile")

        dep = server.deploy(repo.path, commit, service="hostile")
        final = server.wait_final(dep, timeout=120)
        assert final["status"] == "Success", final

        report = httpx.get(final["result"]["url"] + "/report", timeout=10).json()
        for phase in ("build", "run"):
            seen = report[phase]
            assert seen["uid"] != 0, phase
            leaked = {k: v for k, v in seen.items() if v == "LEAKED"}
            assert leaked == {}, (phase, leaked)
            for target in SECRET_FILES:
                assert seen[f"read {target}"].startswith("blocked: "), (phase, target)
            assert seen["environs with the server's secret"] == [], phase
            assert seen["own environment has the secret"] is False, phase

        # Nothing secret anywhere a user or operator reads.
        secrets = [(data / f).read_bytes() for f in SECRET_FILES] + [value.encode()]
        assert server.client is not None
        answers = [
            server.client.get(f"/api/v1/deployments/{dep}").text,
            server.client.get(f"/api/v1/deployments/{dep}/logs").text,
            server.client.get(f"/api/v1/deployments/{dep}/audit").text,
            server.client.get("/api/v1/services/hostile").text,
            json.dumps(report),
        ]
        logs = [p.read_text(errors="replace") for p in data.rglob("*.log")]
        assert any("probe.py" in text for text in answers + logs)  # the build log is there
        for secret in secrets:
            for form in _forms(secret):
                for text in answers + logs:
                    assert form not in text

        # The database and the audit anchor were not written: the trail still verifies.
        verify = subprocess.run(
            [sys.executable, "-m", "shipyard.cli.main", "audit", "verify", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        checked = subprocess.run(
            [sys.executable, "-m", "shipyard.cli.main", "audit", "verify", "--data-dir", str(data),
             "--checkpoint", str(witness)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        server.stop()
        server.stop_agent()
