"""The deployment record: typed, versioned, and able to read what earlier Shipyards wrote."""

from __future__ import annotations

import typing
from typing import Any

import pytest

from shipyard.analysis.policy import AnalysisPolicy
from shipyard.analysis.verdicts import AnalysisRun
from shipyard.domain.models import DeploymentStatus
from shipyard.errors import HealthCheckFailed, PermanentError
from shipyard.orchestrator.record import (
    SCHEMA_VERSION,
    STEP_TYPES,
    DeploymentRecord,
    PlanRecord,
    RecordedError,
    RevisionRecord,
    RollbackRecord,
    dump_record,
    load_record,
)
from shipyard.runtime.base import StickyKey
from shipyard.strategies.steps import (
    Analyse,
    AwaitHealthy,
    AwaitPromotion,
    Bake,
    CallGate,
    KeepWarm,
    Pause,
    RollingLimits,
    RunHook,
    ScaleCandidate,
    ScaleStable,
    SetWeight,
    StartCandidate,
    Step,
)

EVERY_STEP: list[Step] = [
    StartCandidate(),
    AwaitHealthy(),
    Pause(30),
    SetWeight(10, name="canary_1", sticky=True),
    Bake(60),
    KeepWarm(30),
    Analyse(600, 1, 10, AnalysisPolicy(min_requests=50, insufficient_data="pause")),
    AwaitPromotion(1, name="gate_1"),
    ScaleCandidate(2, name="scale_up_2"),
    ScaleStable(1, name="scale_down_1"),
    RunHook("pre_deploy"),
    CallGate(at="pre_switch", gate="change-board"),
]

REQUEST = {
    "id": "6f0c4d1e-5a53-4f2b-9a3c-7d2f1e0b9c8a",
    "source": {"repository": "/repo", "branch": "main", "commit": "abcd1234"},
    "target": {"service_name": "api", "region": "local"},
    "strategy": {"Rolling": {"max_surge": 1, "max_unavailable": 0}},
}

#: A rolling deployment in flight, as Shipyard wrote it before records were versioned.
V0_DEPLOY: dict[str, Any] = {
    "id": REQUEST["id"],
    "kind": "deploy",
    "service": "api",
    "region": "local",
    "status": "Deploying",
    "strategy": REQUEST["strategy"],
    "source": REQUEST["source"],
    "request": REQUEST,
    "triggered_by": "alice",
    "created_ts": 1700000000.0,
    "created_at": "2023-11-14T22:13:20+00:00",
    "updated_at": "2023-11-14T22:13:25+00:00",
    "stages": [
        {
            "name": "scale_up_1",
            "status": "running",
            "started_at": "2023-11-14T22:13:24+00:00",
            "_t0": 1700000004.0,
            "detail": {"replicas": 1},
        }
    ],
    "metrics": {},
    "progress": {
        "phase": "steps",
        "step": 0,
        "plan": [{"type": "ScaleCandidate", "replicas": 1, "name": "scale_up_1"}],
        "sticky": {"header": "x-user", "cookie": None},
        "rolling": {"replicas": 3, "stable_replicas": 4, "max_surge": 1, "max_unavailable": 0},
        "step_started_at": 1700000004.0,
        "abort_requested_monotonic": 2637.49,
    },
    "first_deploy": False,
    "stable_at_submit": "old-1",
    "blue_revision": "old-1",
    "green_revision": "abcd123-6f0c4d1e",
    "error": {
        "type": "HealthCheckFailed",
        "code": "health_check_failed",
        "message": "unhealthy",
        "attempts": 3,
    },
}


@pytest.mark.parametrize("step", EVERY_STEP, ids=lambda s: type(s).__name__)
def test_every_step_type_is_stored_and_read_back(step: Step) -> None:
    plan = PlanRecord(steps=[step])
    stored = plan.model_dump(mode="json")["steps"][0]
    assert stored["type"] == type(step).__name__
    assert PlanRecord.model_validate({"steps": [stored]}).steps == [step]


def test_the_codec_knows_every_step_type() -> None:
    assert set(STEP_TYPES.values()) == set(typing.get_args(Step))
    assert {type(s) for s in EVERY_STEP} == set(typing.get_args(Step))


def test_a_version_0_document_is_migrated() -> None:
    record = load_record(V0_DEPLOY)
    assert isinstance(record, DeploymentRecord)
    assert record.schema_version == SCHEMA_VERSION
    assert record.status is DeploymentStatus.DEPLOYING
    plan = record.progress.plan
    assert plan is not None
    assert plan.steps == [ScaleCandidate(1, name="scale_up_1")]
    assert plan.sticky == StickyKey(header="x-user")
    assert plan.rolling == RollingLimits(
        replicas=3, stable_replicas=4, max_surge=1, max_unavailable=0
    )
    assert record.stages[0].started_ts == 1700000004.0
    assert record.error is not None
    restored = record.error.error()
    assert isinstance(restored, HealthCheckFailed) and restored.attempts == 3
    # Monotonic readings of another process are dropped, not carried over.
    assert "abort_requested_monotonic" not in dump_record(record)["progress"]


def test_documents_from_before_stable_at_submit_take_the_planned_stable() -> None:
    old = {k: v for k, v in V0_DEPLOY.items() if k not in ("stable_at_submit", "first_deploy")}
    record = load_record(old)
    assert (record.stable_at_submit, record.first_deploy) == ("old-1", False)


def test_records_round_trip_at_the_current_version() -> None:
    record = load_record(V0_DEPLOY)
    record.progress.promoted_by = "bob"
    stored = dump_record(record)
    assert stored["schema_version"] == SCHEMA_VERSION
    assert load_record(stored) == record


def test_a_record_from_a_newer_shipyard_is_refused_with_a_reason() -> None:
    newer = {**dump_record(load_record(V0_DEPLOY)), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(PermanentError, match="newer Shipyard"):
        load_record(newer)


def test_a_rollback_is_its_own_kind_of_record() -> None:
    stored = {
        **{k: V0_DEPLOY[k] for k in ("service", "region", "triggered_by", "source")},
        **{k: V0_DEPLOY[k] for k in ("created_ts", "created_at", "updated_at")},
        "id": "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10",
        "kind": "rollback",
        "status": "Pending",
        "strategy": {"Rollback": {"instant": True}},
        "rollback_of": V0_DEPLOY["id"],
        "blue_revision": "abcd123-6f0c4d1e",
        "green_revision": "old-1",
        "first_deploy": False,
        "stable_at_submit": "abcd123-6f0c4d1e",
        "stages": [],
        "metrics": {},
        "progress": {
            "phase": "steps",
            "step": 0,
            "plan": [{"type": "SetWeight", "candidate": 100, "name": "switch", "sticky": False}],
            "manual_rollback_started": 2636.2,
        },
    }
    record = load_record(stored)
    assert isinstance(record, RollbackRecord)
    assert record.strategy.Rollback.instant is True
    assert dump_record(record)["strategy"] == {"Rollback": {"instant": True}}


def test_an_analysis_state_keeps_its_tallies() -> None:
    doc = dump_record(load_record(V0_DEPLOY))
    run = AnalysisRun(AnalysisPolicy(min_requests=5), measurements=7, passed=6, failed=1)
    doc["progress"]["analysis"] = {
        "step": 0,
        "deadline": 1700000600.0,
        "last_at": 1700000070.0,
        "baseline": {"abcd123-6f0c4d1e": {"requests": 10}},
        "run": run.to_dict(),
        "paused": None,
    }
    state = load_record(doc).progress.analysis
    assert state is not None and state.run == run


def test_a_recorded_error_keeps_its_detail() -> None:
    err = RecordedError.of(HealthCheckFailed("unhealthy", attempts=3, replica="r-1"))
    assert err.model_dump() == HealthCheckFailed("unhealthy", attempts=3, replica="r-1").to_dict()


def test_a_revision_stored_before_health_endpoint_takes_it_from_its_health_check() -> None:
    stored = {
        "service": "api",
        "revision": "v1",
        "artifact_digest": "sha256:x",
        "artifact_location": "/a",
        "argv": ["python3", "app.py"],
        "health": {"endpoint": "/ready"},
        "attestation": {},
    }
    rev = RevisionRecord.model_validate(stored)
    assert rev.spec().health_endpoint == "/ready"
    assert rev.health_check().endpoint == "/ready"
    assert rev.attestation.envelope is None


def test_a_record_stored_with_credentials_in_its_url_loads_redacted() -> None:
    # Written before such URLs were refused: it must still load, and never show the secret.
    secret = "ghp_storedBeforeTheRule"
    stored = dump_record(load_record(V0_DEPLOY))
    leaky = f"https://ci:{secret}@git.example.invalid/org/api.git"
    stored["source"] = {**stored["source"], "repository": leaky}
    stored["request"] = {**stored["request"], "source": stored["source"]}
    record = load_record(stored)
    assert isinstance(record, DeploymentRecord)
    assert record.request.source.repository == "https://***@git.example.invalid/org/api.git"
    assert record.source is not None and record.source.repository == (
        "https://***@git.example.invalid/org/api.git"
    )
    assert secret not in str(dump_record(record))
    assert stored["source"]["repository"] == leaky  # the caller's document is not changed
