"""The error tree's registry: every error stored with ``to_dict`` comes back as its own class."""

from __future__ import annotations

import pytest

from shipyard import errors
from shipyard.errors import (
    ERRORS_BY_CODE,
    AnalysisFailed,
    DeploymentAborted,
    DeploymentError,
    HealthCheckFailed,
    SecurityScanFailed,
    ShipyardError,
)


def _all(root: type[ShipyardError]) -> list[type[ShipyardError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _all(sub))]


def test_every_error_with_its_own_code_is_registered() -> None:
    own = [c for c in _all(ShipyardError) if "code" in c.__dict__]
    assert {c.code: c for c in own} == ERRORS_BY_CODE
    in_errors = [c for c in _all(ShipyardError) if c.__module__ == "shipyard.errors"]
    assert all("code" in c.__dict__ for c in in_errors)  # the tree in errors.py: all of them


def test_a_code_can_be_taken_once() -> None:
    with pytest.raises(TypeError, match="'build_failed' of Imposter is BuildFailed's"):

        class Imposter(DeploymentError):
            code = "build_failed"


def test_a_subclass_that_keeps_its_parents_code_comes_back_as_the_parent() -> None:
    class Quiet(errors.InvalidInput):
        pass

    restored = errors.from_dict(Quiet("bad flag", flag="x").to_dict())
    assert type(restored) is errors.InvalidInput
    assert restored.detail == {"flag": "x"}


@pytest.mark.parametrize(
    "error",
    [
        HealthCheckFailed("unhealthy in the bake window", attempts=3, replica="r-1"),
        SecurityScanFailed("blocked", vulnerabilities=2, findings=[{"package": "pyyaml"}]),
        AnalysisFailed("success rate 0.8 < 0.99", stage=1, verdict="fail"),
        DeploymentAborted("aborted by carol", aborted_by="carol"),
        DeploymentError("internal error: KeyError('x')"),
        errors.AgentUnavailable("agent down", retry_after=5),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_stored_error_is_rebuilt_as_its_class(error: ShipyardError) -> None:
    restored = errors.from_dict(error.to_dict())
    assert type(restored) is type(error)
    assert restored.to_dict() == error.to_dict()


def test_an_unknown_code_comes_back_as_a_deployment_error() -> None:
    stored = {"type": "FutureError", "code": "future", "message": "from a newer Shipyard", "x": 1}
    restored = errors.from_dict(stored)
    assert type(restored) is DeploymentError
    assert (restored.message, restored.detail) == ("from a newer Shipyard", {"x": 1})


def test_detail_missing_a_required_field_still_restores() -> None:
    restored = errors.from_dict({"code": "health_check_failed", "message": "old"})
    assert isinstance(restored, DeploymentError) and restored.message == "old"
