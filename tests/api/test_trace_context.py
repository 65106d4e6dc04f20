"""The deploy API and W3C trace context: a ``traceparent`` makes the deployment's trace a child
of the caller's span, the trace id is answered (202 and ``GET /deployments/{id}``) and is in
every audit record the API shows; a malformed header is ignored (a new trace)."""

from __future__ import annotations

import re

import httpx

from tests.api.test_api import Harness, body

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_a_deploy_with_traceparent_continues_the_callers_trace(
    client: httpx.AsyncClient, h: Harness
) -> None:
    headers = {**h.headers(), "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    r = await client.post("/api/v1/deploy", json=body(), headers=headers)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["trace_id"] == CALLER_TRACE
    await h.until(accepted["deployment_id"], "Success")
    url = f"/api/v1/deployments/{accepted['deployment_id']}"
    doc = (await client.get(url, headers=h.headers())).json()
    assert doc["trace_id"] == CALLER_TRACE
    stored = h.store.get_deployment(accepted["deployment_id"])
    assert stored["trace_parent_span_id"] == CALLER_SPAN and stored["trace_flags"] == 1
    audit = (await client.get(f"{url}/audit", headers=h.headers())).json()["records"]
    assert len(audit) >= 5 and audit[0]["event_type"] == "deployment.requested"
    assert {r["detail"]["trace_id"] for r in audit} == {CALLER_TRACE}


async def test_a_malformed_traceparent_is_ignored(client: httpx.AsyncClient, h: Harness) -> None:
    headers = {**h.headers(), "traceparent": f"00-{CALLER_TRACE}-zz-01"}
    r = await client.post("/api/v1/deploy", json=body(), headers=headers)
    assert r.status_code == 202, r.text
    trace_id = r.json()["trace_id"]
    assert re.fullmatch("[0-9a-f]{32}", trace_id) and trace_id != CALLER_TRACE
    stored = h.store.get_deployment(r.json()["deployment_id"])
    assert stored["trace_parent_span_id"] is None
