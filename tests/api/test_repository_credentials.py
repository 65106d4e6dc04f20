"""A deploy request whose repository URL carries a credential: 422 with advice, and the secret is
nowhere afterwards — not in the answer, the store, the audit trail, any log record, or any file
under the data directory."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from tests.api.test_api import Harness, body

SECRET = "ghp_0123456789abcdefSECRET"


@pytest.mark.parametrize(
    ("repository", "shown"),
    [
        (f"https://ci:{SECRET}@git.example.invalid/org/app.git", "https://***@git.example.invalid"),
        (f"https://{SECRET}@git.example.invalid/org/app.git", "https://***@git.example.invalid"),
        (f"ssh://deploy:{SECRET}@git.example.invalid/org/app", "ssh://***@git.example.invalid"),
    ],
    ids=["user-and-token", "token-only", "ssh-password"],
)
async def test_credentials_in_the_repository_url_are_refused_and_kept_nowhere(
    client: httpx.AsyncClient,
    h: Harness,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    repository: str,
    shown: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    request = body()
    request["source"]["repository"] = repository

    r = await client.post("/api/v1/deploy", json=request, headers=h.headers())

    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["error"] == "invalid_request"
    assert [e["field"] for e in problem["errors"]] == ["source.repository"]
    assert shown in problem["detail"]
    assert "credential helper" in problem["detail"]
    assert SECRET not in r.text
    assert h.store.list_deployments() == []
    assert await h.audit.records() == []
    assert all(SECRET not in rec.getMessage() for rec in caplog.records)
    assert SECRET not in caplog.text
    h.store.engine.dispose()  # flush SQLite's WAL so the files below hold everything it has
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"{f} holds the secret"


async def test_an_ssh_login_name_is_not_a_credential(client: httpx.AsyncClient, h: Harness) -> None:
    request = body()
    request["source"]["repository"] = "ssh://git@git.example.invalid/org/app.git"
    r = await client.post("/api/v1/deploy", json=request, headers=h.headers())
    assert r.status_code == 202, r.text
    await h.until(r.json()["deployment_id"], "Success")
