"""``shipyard serve`` exporting a deployment's trace over real OTLP/HTTP: the process is
configured by the standard variables only, and a receiver in the test (``tests/otlp.py``)
decodes what arrives. The caller's ``traceparent`` is the root's parent; the trace id is in
the API and the audit records; the batch is flushed when serve stops; the control plane's
``OTEL_*`` never reach the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.cli.demo import _git
from tests.e2e.support import Server
from tests.otlp import ReceivedSpan, otlp_receiver

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def test_serve_exports_one_trace_per_deployment_over_otlp_http(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with otlp_receiver() as receiver:
        # The child process inherits these: nothing else tells serve where spans go.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "shipyard-e2e")
        # Ten minutes between batches: what arrives was flushed when serve stopped.
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
        server = Server(tmp_path / "data").start()
        try:
            assert server.client is not None
            answer = server.client.post(
                "/api/v1/deploy",
                headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
                json={
                    "source": {
                        "repository": str(repo),
                        "branch": "main",
                        "commit": _git(repo, "rev-parse", "HEAD"),
                    },
                    "target": {"service_name": "hello", "region": "local"},
                    "strategy": {"BlueGreen": {"switch_delay_seconds": 0}},
                },
            )
            assert answer.status_code == 202, answer.text
            assert answer.json()["trace_id"] == CALLER_TRACE
            doc = server.wait_final(answer.json()["deployment_id"])
            assert doc["status"] == "Success", doc.get("error")
            assert doc["trace_id"] == CALLER_TRACE

            audit = server.client.get(f"/api/v1/deployments/{doc['id']}/audit").json()["records"]
            assert audit and {r["detail"].get("trace_id") for r in audit} == {CALLER_TRACE}

            # The app's own environment: the control plane's OTEL_* stay out of it.
            (replica,) = server.service()["replicas"]
            environ = Path(f"/proc/{replica['pid']}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"OTEL_")]
            assert any(v.startswith(b"PORT=") for v in environ)  # it is the replica's
            assert receiver.spans() == []  # still batched
            server.stop()  # SIGTERM: a graceful stop flushes the batch

            def root_arrived(spans: list[ReceivedSpan]) -> bool:
                return any(s.name == "deployment hello" for s in spans)

            spans = [
                s for s in receiver.wait_for(root_arrived, timeout=60) if s.trace_id == CALLER_TRACE
            ]
            (root,) = [s for s in spans if s.name == "deployment hello"]
            assert root.parent_span_id == CALLER_SPAN
            assert root.attributes["shipyard.deployment.id"] == doc["id"]
            assert root.attributes["deployment.status"] == "succeeded"
            assert root.attributes["shipyard.revision"] == doc["green_revision"]
            assert root.resource["service.name"] == "shipyard-e2e"
            stages = [s for s in spans if s.parent_span_id == root.span_id]
            assert sorted(s.name for s in stages) == sorted(s["name"] for s in doc["stages"])
            assert {"build", "scan", "start", "health_check", "switch"} <= {s.name for s in stages}
            assert all(s.status_code == 0 for s in [root, *stages])  # UNSET: nothing failed
            assert receiver.refused == []
        finally:
            server.stop()
            server.stop_agent()
