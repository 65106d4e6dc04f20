"""The wire format is the ADR's serde format: its own JSON shapes must round-trip unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from shipyard.domain.models import (
    BlueGreen,
    Canary,
    DeploymentMetrics,
    DeploymentRequest,
    Rolling,
    validate_performance,
)

ADR_REQUEST: dict[str, Any] = {
    "id": "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10",
    "source": {"repository": "test-repo", "branch": "main", "commit": "abc123", "dockerfile": None},
    "target": {"service_name": "api", "region": "us-central1", "project_id": "test-project"},
    "strategy": {"BlueGreen": {"switch_delay_seconds": 30}},
    "metadata": {},
}


def test_adr_request_parses_and_serializes_externally_tagged() -> None:
    req = DeploymentRequest.model_validate(ADR_REQUEST)
    assert isinstance(req.strategy, BlueGreen)
    assert req.strategy.BlueGreen.switch_delay_seconds == 30
    wire = json.loads(req.model_dump_json())
    assert wire["strategy"] == {
        "BlueGreen": {
            "switch_delay_seconds": 30,
            "bake_seconds": 30.0,
            "scale_down_delay_seconds": 30.0,
        }
    }
    assert wire["source"] == ADR_REQUEST["source"]
    assert wire["target"] == ADR_REQUEST["target"]
    assert DeploymentRequest.model_validate(wire) == req


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        ({"BlueGreen": {"switch_delay_seconds": 0}}, BlueGreen),
        ({"Canary": {"stages": [{"weight": 10, "duration_seconds": 60}]}}, Canary),
        ({"Rolling": {"max_surge": 1, "max_unavailable": 0}}, Rolling),
        ({"Rolling": {"max_surge": "25%", "max_unavailable": "25%"}}, Rolling),
    ],
    ids=["blue-green", "canary", "rolling", "rolling-percent"],
)
def test_each_strategy_round_trips(strategy: dict[str, Any], kind: Any) -> None:
    req = DeploymentRequest.model_validate({**ADR_REQUEST, "strategy": strategy})
    assert isinstance(req.strategy, kind)
    out = json.loads(req.model_dump_json())["strategy"]
    assert list(out) == list(strategy)
    assert _contains(out[kind.kind], next(iter(strategy.values())))


def _contains(have: Any, want: Any) -> bool:
    """Every field the client sent comes back with the same value (defaults may be added)."""
    if isinstance(want, dict):
        return all(k in have and _contains(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return len(have) == len(want) and all(map(_contains, have, want))
    return bool(have == want)


def test_request_id_and_metadata_are_optional() -> None:
    body = {k: v for k, v in ADR_REQUEST.items() if k not in ("id", "metadata")}
    a = DeploymentRequest.model_validate(body)
    b = DeploymentRequest.model_validate(body)
    assert a.id != b.id


def test_rebuild_is_an_optional_extension() -> None:
    # The ADR's own request has no "rebuild": it parses, and means "reuse the build cache".
    assert DeploymentRequest.model_validate(ADR_REQUEST).rebuild is False
    req = DeploymentRequest.model_validate({**ADR_REQUEST, "rebuild": True})
    assert req.rebuild is True
    wire = json.loads(req.model_dump_json())
    assert wire["rebuild"] is True
    assert DeploymentRequest.model_validate(wire) == req
    # Documented in the schema the API publishes (OpenAPI is generated from this model).
    schema = DeploymentRequest.model_json_schema()["properties"]["rebuild"]
    assert schema["default"] is False and "afresh" in schema["description"]


def _error_fields(body: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        DeploymentRequest.model_validate(body)
    return [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"strategy": {"Blue": {}}}, "strategy"),
        ({"strategy": {"BlueGreen": {}, "Canary": {"stages": []}}}, "strategy"),
        ({"strategy": "BlueGreen"}, "strategy"),
        ({"strategy": {"BlueGreen": {"switch_delay_seconds": -1}}}, "switch_delay_seconds"),
        ({"strategy": {"BlueGreen": {"switch_delay_seconds": "soon"}}}, "switch_delay_seconds"),
        ({"strategy": {"Rolling": {"max_surge": 0, "max_unavailable": 0}}}, "Rolling"),
        ({"strategy": {"Rolling": {"max_surge": "250%", "max_unavailable": 1}}}, "max_surge"),
        ({"strategy": {"Canary": {"stages": [{"weight": 101}]}}}, "weight"),
        ({"target": {"service_name": "Not_A_Label"}}, "service_name"),
        ({"target": {"service_name": "-api"}}, "service_name"),
        ({"target": {"service_name": "a" * 64}}, "service_name"),
        ({"source": {**ADR_REQUEST["source"], "commit": "zzzz"}}, "commit"),
        ({"source": {**ADR_REQUEST["source"], "branch": "--upload-pack=evil"}}, "branch"),
        ({"source": {**ADR_REQUEST["source"], "branch": "a..b"}}, "branch"),
        ({"source": {**ADR_REQUEST["source"], "dockerfile": "../../etc/passwd"}}, "dockerfile"),
        ({"source": {**ADR_REQUEST["source"], "dockerfile": "/etc/passwd"}}, "dockerfile"),
        ({"source": {**ADR_REQUEST["source"], "extra": 1}}, "extra"),
        ({"target": None}, "target"),
        ({"rebuild": "sometimes"}, "rebuild"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_names_the_field(patch: dict[str, Any], field: str) -> None:
    fields = _error_fields({**ADR_REQUEST, **patch})
    assert any(field in f for f in fields), fields


def test_performance_validation_against_adr_targets() -> None:
    ok = validate_performance(
        DeploymentMetrics(
            build_duration_ms=240_000, rollback_duration_ms=30_000, health_check_duration_ms=5_000
        )
    )
    assert (ok.build_time_ok, ok.rollback_time_ok, ok.health_check_ok) == (True, True, True)
    slow = validate_performance(
        DeploymentMetrics(
            build_duration_ms=240_001, rollback_duration_ms=30_001, health_check_duration_ms=5_001
        )
    )
    assert (slow.build_time_ok, slow.rollback_time_ok, slow.health_check_ok) == (
        False,
        False,
        False,
    )
    none = validate_performance(DeploymentMetrics())
    assert none.rollback_time_ok is None


def test_repository_with_credentials_is_refused_without_repeating_them() -> None:
    secret = "glpat-Sup3rS3cret"
    body = {
        **ADR_REQUEST,
        "source": {
            **ADR_REQUEST["source"],
            "repository": f"https://oauth2:{secret}@git.example.invalid/org/app.git",
        },
    }
    with pytest.raises(ValidationError) as info:
        DeploymentRequest.model_validate(body)
    (error,) = info.value.errors()
    assert error["loc"] == ("source", "repository")
    assert "https://***@git.example.invalid/org/app.git" in error["msg"]
    assert "credential helper" in error["msg"]
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in error["msg"]
