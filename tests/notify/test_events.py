"""Which audit records notify, and what the body and the Slack line say."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from shipyard.audit.chain import AuditRecord
from shipyard.notify import events

SRC = Path(events.__file__).parents[1]


@pytest.mark.parametrize(
    ("event_type", "detail", "expected"),
    [
        ("deployment.requested", {}, "deployment.started"),
        ("rollback.requested", {}, "deployment.started"),
        ("traffic.switched", {}, "stage.done"),
        ("hook.failed", {}, "stage.done"),
        ("analysis.paused", {}, "deployment.paused"),
        ("deployment.promoted", {}, "deployment.promoted"),
        ("deployment.unfrozen", {"action": "promote"}, "deployment.promoted"),
        ("deployment.unfrozen", {"action": "abort"}, None),
        ("deployment.rolledback", {}, "deployment.rolled_back"),
        ("deployment.failed", {}, "deployment.failed"),
        ("deployment.success", {}, "deployment.succeeded"),
        ("deployment.frozen", {}, "deployment.frozen"),
        ("data_plane.drift", {}, "drift.found"),
        ("analysis.measurement", {}, None),
        ("token.revoked", {}, None),
    ],
)
def test_event_of(event_type: str, detail: dict[str, str], expected: str | None) -> None:
    assert events.event_of(event_type, detail) == expected


def test_every_mapped_event_is_one_a_sink_can_ask_for() -> None:
    assert set(events.AUDIT_TO_EVENT.values()) | {events.CHECKPOINT_EVENT} == set(events.EVENTS)


def test_the_terminal_events_are_the_ones_the_orchestrator_audits() -> None:
    """``outcome.py`` audits ``deployment.<status lower-cased>``: the table must use those."""
    from shipyard.domain.models import TERMINAL_STATUSES

    for status in TERMINAL_STATUSES:
        assert f"deployment.{status.value.lower()}" in events.AUDIT_TO_EVENT


def test_the_mapped_event_types_exist_in_the_code() -> None:
    """A renamed audit event would silently stop notifying: every type of the table that the
    code base emits today is still emitted (hooks, gates and freeze land with issue 16's other
    branches, so they are left out here)."""
    pending = {"hook.succeeded", "hook.failed", "gate.passed", "gate.refused"}
    pending |= {"deployment.frozen", "deployment.unfrozen"}
    terminal = {"deployment.rolledback", "deployment.failed", "deployment.success"}
    # stage.py audits a failed stage as f"{audit}.failed": checked below through the stages.
    stage_failures = {t for t in events.AUDIT_TO_EVENT if t.endswith(".failed")} - terminal
    source = subprocess.run(
        ["grep", "-rhoE", r"\"[a-z_]+\.[a-z_]+\"", str(SRC / "orchestrator")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    emitted = {s.strip('"') for s in source.split()}
    for event_type in set(events.AUDIT_TO_EVENT) - pending - terminal - stage_failures:
        assert event_type in emitted, event_type
    audited_stages = subprocess.run(
        ["grep", "-rhoE", r"audit=\"[a-z_]+\"", str(SRC / "orchestrator")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {s.split('"')[1] for s in audited_stages.split()}
    for event_type in stage_failures - pending:
        assert event_type.removesuffix(".failed") in names, event_type


def record(**over: object) -> AuditRecord:
    fields: dict[str, object] = {
        "seq": 7,
        "timestamp": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "event_type": "deployment.failed",
        "deployment_id": "d" * 36,
        "service": "web",
        "region": "local",
        "user": "alice",
        "status": "Failed",
        "duration_ms": 12,
        "detail": {"error": "boom", "trace_id": "t" * 32},
        "prev_hash": "0" * 64,
        "hash": "a" * 64,
    }
    fields.update(over)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def test_the_body_carries_the_summary_and_the_record_to_check_against_the_trail() -> None:
    doc = {
        "green_revision": "web-v2",
        "blue_revision": "web-v1",
        "request": {"strategy": {"kind": "BlueGreen"}, "source": {"repository": "secret-repo"}},
        "trace_id": "t" * 32,
    }
    got = json.loads(events.body("deployment.failed", record(), doc))
    assert got["event"] == "deployment.failed"
    assert got["audit"] == {"seq": 7, "hash": "a" * 64}
    assert got["occurred_at"] == "2026-01-02T03:04:05.000000+00:00"
    assert got["deployment"] == {
        "id": "d" * 36,
        "service": "web",
        "region": "local",
        "status": "Failed",
        "user": "alice",
        "revision": "web-v2",
        "stable_revision": "web-v1",
        "blue_revision": "web-v1",
        "green_revision": "web-v2",
        "strategy": "BlueGreen",
        "trace_id": "t" * 32,
    }
    assert "secret-repo" not in events.body("deployment.failed", record(), doc)
    # The same record always gives the same bytes (each retry is signed over the same body).
    assert events.body("deployment.failed", record(), doc) == events.body(
        "deployment.failed", record(), dict(doc)
    )


def test_the_slack_line_names_service_revision_and_event() -> None:
    payload = json.loads(events.body("deployment.rolled_back", record(), {"green_revision": "v2"}))
    text = events.slack_text("deployment.rolled_back", payload)
    assert text == (
        "Shipyard: web (local) rolled back, revision v2, status Failed, deployment dddddddd"
    )
    assert "http" not in text
