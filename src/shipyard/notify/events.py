"""Which audit records are notifications, and what a notification's body says.

The notification events a sink may filter on (``EVENTS``) and the one table mapping the audit
trail's event types to them (``AUDIT_TO_EVENT``); ``event_of`` is what the outbox writer
(``notify/outbox_writer.py``) asks of every appended audit record. ``body`` builds the JSON a
webhook receives: the event, the deployment's summary, the audit record's seq and hash (so a
receiver can check it against ``shipyard audit show``/``verify``) and when it happened. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shipyard.audit.chain import AuditRecord, format_timestamp

#: Every event a sink can ask for, with what it means (``shipyard notifications add --help``).
EVENTS: dict[str, str] = {
    "deployment.started": "a deployment or a manual rollback was accepted",
    "stage.done": "a stage finished (build, scan, start, switch, health, hook, gate...)",
    "deployment.paused": "a deployment waits for a human's promote",
    "deployment.promoted": "a paused or frozen deployment was promoted",
    "deployment.rolled_back": "a deployment ended rolled back",
    "deployment.failed": "a deployment ended failed",
    "deployment.succeeded": "a deployment ended successfully",
    "deployment.frozen": "a check failed with on_failure=freeze: traffic stays, a human decides",
    "drift.found": "the data plane differed from the store (the reconciler repaired it)",
    "audit.checkpoint": "an audit checkpoint was published to a witness",
}

#: The audit trail's event types (``grep -rn 'audit("' src/shipyard``) that are notifications.
AUDIT_TO_EVENT: dict[str, str] = {
    "deployment.requested": "deployment.started",
    "rollback.requested": "deployment.started",
    "build.succeeded": "stage.done",
    "security_scan.passed": "stage.done",
    "revision.started": "stage.done",
    "replicas.scaled": "stage.done",
    "traffic.switched": "stage.done",
    "health_check.passed": "stage.done",
    "analysis.passed": "stage.done",
    # A stage that failed: ``stage.py`` audits ``<audit>.failed`` (the deployment's own end,
    # rolled back or failed, follows as its own event).
    "build.failed": "stage.done",
    "security_scan.failed": "stage.done",
    "health_check.failed": "stage.done",
    "bake.failed": "stage.done",
    "analysis.failed": "stage.done",
    "hook.succeeded": "stage.done",
    "hook.failed": "stage.done",
    "gate.passed": "stage.done",
    "gate.refused": "stage.done",
    "deployment.paused": "deployment.paused",
    "analysis.paused": "deployment.paused",
    "deployment.promoted": "deployment.promoted",
    "deployment.unfrozen": "deployment.promoted",  # only with action "promote": event_of
    "deployment.rolledback": "deployment.rolled_back",
    "deployment.failed": "deployment.failed",
    "deployment.success": "deployment.succeeded",
    "deployment.frozen": "deployment.frozen",
    "data_plane.drift": "drift.found",
}

#: Not an audit record: the checkpoint publisher's acceptance by a witness
#: (``audit/publishing.py``); its body has the tree head instead of a record.
CHECKPOINT_EVENT = "audit.checkpoint"

#: Keys of a deployment's stored document copied into the summary (never secrets: the record
#: holds none, and the request's source is left out).
_SUMMARY_KEYS = ("regions", "blue_revision", "green_revision", "trace_id", "created_at")


def event_of(event_type: str, detail: Mapping[str, Any]) -> str | None:
    """The notification event an audit record of ``event_type`` is, or None."""
    event = AUDIT_TO_EVENT.get(event_type)
    if event_type == "deployment.unfrozen" and detail.get("action") != "promote":
        return None  # an abort: the rollback that follows notifies
    return event


def check_events(events: list[str] | tuple[str, ...]) -> list[str]:
    """Unknown event names in ``events`` (the callers raise InvalidInput with the valid ones)."""
    return [e for e in events if e not in EVENTS]


def summary(record: AuditRecord, doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """The deployment summary of ``record`` (``doc``: the deployment's stored document, when
    the record is about one)."""
    out: dict[str, Any] = {
        "id": record.deployment_id,
        "service": record.service,
        "region": record.region,
        "status": record.status,
        "user": record.user,
    }
    if doc is not None:
        for key in _SUMMARY_KEYS:
            if doc.get(key) is not None:
                out[key] = doc[key]
        strategy = (
            doc.get("request", {}).get("strategy") if isinstance(doc.get("request"), dict) else None
        )
        if isinstance(strategy, dict) and "kind" in strategy:
            out["strategy"] = strategy["kind"]
        out["revision"] = doc.get("green_revision")
        out["stable_revision"] = doc.get("blue_revision")
    return {k: v for k, v in out.items() if v is not None}


def body(event: str, record: AuditRecord, doc: Mapping[str, Any] | None) -> str:
    """The JSON body of a notification for ``record`` (compact, sorted keys: the same record
    always gives the same bytes, so every retry is signed over the same body)."""
    return _dump(
        {
            "event": event,
            "audit_event": record.event_type,
            "deployment": summary(record, doc),
            "detail": _plain(record.detail),
            "audit": {"seq": record.seq, "hash": record.hash},
            "occurred_at": format_timestamp(record.timestamp),
        }
    )


def checkpoint_body(witness: str, tree_size: int, root_hash: str, published_at: str) -> str:
    """The body of an ``audit.checkpoint`` notification."""
    return _dump(
        {
            "event": CHECKPOINT_EVENT,
            "checkpoint": {"witness": witness, "tree_size": tree_size, "root_hash": root_hash},
            "occurred_at": published_at,
        }
    )


def slack_text(event: str, payload: Mapping[str, Any]) -> str:
    """The one-line Slack summary of a notification body (service, revision, event; no
    links)."""
    if event == CHECKPOINT_EVENT:
        cp = payload.get("checkpoint", {})
        return f"Shipyard: audit checkpoint published (tree size {cp.get('tree_size')})"
    dep = payload.get("deployment")
    if not isinstance(dep, dict):
        return f"Shipyard: {event}"
    where = dep.get("service") or "?"
    if dep.get("region"):
        where += f" ({dep['region']})"
    revision = dep.get("revision")
    text = f"Shipyard: {where} {event.replace('deployment.', '').replace('_', ' ')}"
    if revision:
        text += f", revision {revision}"
    if dep.get("status"):
        text += f", status {dep['status']}"
    if dep.get("id"):
        text += f", deployment {str(dep['id'])[:8]}"
    return text


def _plain(value: Mapping[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(dict(value)))
    return loaded


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
