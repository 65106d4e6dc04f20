"""The agent's logs API (``POST /v1/services/{s}/logs``) over real sandboxed replicas: both streams
kept apart and stamped, secrets the host knows masked, a crashed process's last lines in the same
replica's log after its restart, a follower's cursor, logs of a stopped replica still readable,
and bad queries refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.agent.server import Agent
from shipyard.agent.supervisor import RestartPolicy
from shipyard.logs import REDACTED
from shipyard.runtime.base import RevisionSpec
from tests.agent.helpers import eventually, make_artifact, running_agent, spec_for

#: Prints to both streams (one line holding the secret it was given), then idles.
CHATTY = (
    "import os, sys, time\n"
    "print('hello from stdout', flush=True)\n"
    "print('oops on stderr', file=sys.stderr, flush=True)\n"
    "print('token=' + os.environ['LEAK'], flush=True)\n"
    "time.sleep(600)\n"
)
#: Dies at start with a traceback (exit code 1).
CRASHING = "print('booting', flush=True)\nraise RuntimeError('no database configured')\n"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with running_agent(
        tmp_path / "data", restart=RestartPolicy(initial_delay=0.05, max_delay=0.2)
    ) as pair:
        yield pair


async def _start(client: httpx.AsyncClient, spec: RevisionSpec) -> list[dict[str, Any]]:
    r = await client.put(
        f"/v1/services/{spec.service}/revisions/{spec.revision}", json=spec.to_dict()
    )
    assert r.status_code == 200, r.text
    replicas: list[dict[str, Any]] = r.json()["replicas"]
    return replicas


async def _logs(client: httpx.AsyncClient, **query: Any) -> dict[str, Any]:
    r = await client.post("/v1/services/svc/logs", json=query)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_both_streams_are_stored_apart_stamped_and_masked(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    a, client = agent
    spec = spec_for(make_artifact(tmp_path, "v1"), argv=["python3", "-c", CHATTY],
                    env={"LEAK": a.token})  # fmt: skip
    [replica] = await _start(client, spec)

    async def three_lines() -> dict[str, Any] | None:
        doc = await _logs(client)
        return doc if len(doc["lines"]) >= 3 else None

    doc = await eventually(three_lines, what="the replica's output")
    by_text = {line["text"]: line for line in doc["lines"]}
    assert by_text["hello from stdout"]["stream"] == "stdout"
    assert by_text["oops on stderr"]["stream"] == "stderr"
    assert f"token={REDACTED}" in by_text
    assert all(a.token not in line["text"] for line in doc["lines"])
    for line in doc["lines"]:
        assert line["replica_id"] == replica["replica_id"] and line["revision"] == "v1"
        assert line["timestamp"] > 1_700_000_000
    # The agent's own files never hold the token either.
    stored = b"".join(p.read_bytes() for p in (a.dir / "logs").rglob("*.log"))
    assert a.token.encode() not in stored and b"hello from stdout" in stored

    # Following: nothing new after the cursor; the filters; the stopped replica's log stays.
    again = await _logs(client, after=doc["cursor"])
    assert again["lines"] == [] and again["cursor"] == doc["cursor"]
    assert len((await _logs(client, tail=1))["lines"]) == 1
    r = await client.post("/v1/services/svc/stop", json={"replica_ids": [replica["replica_id"]]})
    assert r.status_code == 200, r.text
    kept = await _logs(client, revision="v1")
    assert [line["text"] for line in kept["lines"]][:3] == [line["text"] for line in doc["lines"]][
        :3
    ]


async def test_a_crash_loop_keeps_every_start_in_one_log_with_its_traceback(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    _, client = agent
    spec = spec_for(make_artifact(tmp_path, "v1"), argv=["python3", "-c", CRASHING])
    [replica] = await _start(client, spec)

    async def restarted_twice() -> dict[str, Any] | None:
        state = (await client.get("/v1/services/svc")).json()
        [r] = state["replicas"]
        return r if r["restarts"] >= 2 else None

    status = await eventually(restarted_twice, what="two restarts")
    assert status["last_exit_code"] == 1
    doc = await _logs(client, replica_id=replica["replica_id"], tail=50)
    stderr = [line["text"] for line in doc["lines"] if line["stream"] == "stderr"]
    assert "Traceback (most recent call last):" in stderr
    assert "RuntimeError: no database configured" in stderr
    assert [line["text"] for line in doc["lines"]].count("booting") >= 2


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param({"tail": -1}, 422, id="negative-tail"),
        pytest.param({"tail": 10_001}, 422, id="tail-too-large"),
        pytest.param({"after": {"x": -5}}, 422, id="negative-position"),
        pytest.param({"colour": "red"}, 422, id="unknown-field"),
        pytest.param({"replica_id": "nope"}, 404, id="unknown-replica"),
    ],
)
async def test_bad_queries_are_refused(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path, query: dict[str, Any], status: int
) -> None:
    _, client = agent
    await _start(client, spec_for(make_artifact(tmp_path, "v1"), argv=["python3", "-c", CHATTY],
                                  env={"LEAK": "x"}))  # fmt: skip
    r = await client.post("/v1/services/svc/logs", json=query)
    assert r.status_code == status, r.text


async def test_a_service_name_is_never_a_path(agent: tuple[Agent, httpx.AsyncClient]) -> None:
    _, client = agent
    for name in ("..", "UPPER", "nothing-here"):
        r = await client.post(f"/v1/services/{name}/logs", json={})
        assert r.status_code == 404, (name, r.text)
