"""A metric's verdicts (Argo Rollouts' evaluation order) and its schedule, as pure functions."""

from __future__ import annotations

import json

import pytest

from shipyard.analysis.metrics import MetricRun, Reading, judge_reading, start_runs
from shipyard.analysis.policy import AnalysisPolicy, MetricPolicy
from shipyard.analysis.verdicts import AnalysisRun, Outcome, Verdict
from shipyard.domain.expressions import Value


def metric(success: str = "result < 0.05", failure: str | None = None) -> MetricPolicy:
    return MetricPolicy(
        name="error-rate",
        provider="prometheus",
        address="http://127.0.0.1:9090",
        query="q",
        success_condition=success,
        failure_condition=failure,
    )


@pytest.mark.parametrize(
    ("success", "failure", "value", "verdict"),
    [
        pytest.param("result < 0.05", None, 0.01, Verdict.PASS, id="success"),
        pytest.param("result < 0.05", None, 0.1, Verdict.FAIL, id="only-success-not-met-fails"),
        pytest.param("result < 0.05", "result >= 0.2", 0.1, Verdict.INCONCLUSIVE,
                     id="neither-with-failure-condition-is-inconclusive"),
        pytest.param("result < 0.05", "result >= 0.2", 0.3, Verdict.FAIL, id="failure"),
        pytest.param("result < 1", "result > 0", 0.5, Verdict.FAIL,
                     id="both-true-failure-wins"),
        pytest.param("result < 0.05", None, None, Verdict.INSUFFICIENT_DATA, id="no-series"),
        pytest.param("result < 0.05", None, [], Verdict.INSUFFICIENT_DATA, id="empty-list"),
        pytest.param("result < 0.05", None, float("nan"), Verdict.INSUFFICIENT_DATA, id="nan"),
        pytest.param("max(result) < 1", None, [0.1, float("nan")], Verdict.INSUFFICIENT_DATA,
                     id="nan-in-list"),
        pytest.param("result < 0.05", None, [0.01, 0.02], Verdict.ERROR,
                     id="list-compared-with-number-is-an-error"),
        pytest.param("result[2] < 0.05", None, [0.01], Verdict.ERROR, id="index-out-of-range"),
        pytest.param("result < 0.05", None, float("inf"), Verdict.FAIL, id="infinity-is-data"),
    ],
)  # fmt: skip
def test_argo_evaluation(
    success: str, failure: str | None, value: Value | None, verdict: Verdict
) -> None:
    m = judge_reading(metric(success, failure), Reading(value, "q as sent"))
    assert m.verdict is verdict
    d = m.to_dict()
    assert (d["metric"], d["provider"], d["query"]) == ("error-rate", "prometheus", "q as sent")
    assert "requests" not in d  # the router's count, meaningless for a provider's reading
    json.dumps(d, allow_nan=False)  # NaN and infinities are recorded as strings


def test_reasons_say_which_condition_decided() -> None:
    m = judge_reading(metric(failure="result >= 0.2"), Reading(0.1, "q"))
    assert m.reasons == (
        "neither success_condition `result < 0.05` nor failure_condition `result >= 0.2` holds "
        "for result = 0.1",
    )


def run(count: int = 0, interval: float = 10, deadline: float | None = 100) -> MetricRun:
    policy = AnalysisPolicy(interval_seconds=interval)
    return MetricRun("m", AnalysisRun(policy), last_at=0, deadline=deadline, count=count)


def test_a_time_based_metric_is_due_every_interval_and_last_at_its_deadline() -> None:
    r = run(deadline=25)
    assert r.due(25) == 10
    r.last_at = 20
    assert r.due(25) == 25 and not r.at_deadline(24) and r.at_deadline(25)
    r.extend()
    assert r.deadline == 35


def test_a_counted_metric_is_due_every_interval_until_its_count() -> None:
    r = run(count=2, deadline=None)
    assert r.due(5) == 10 and not r.at_deadline(1000)
    assert r.run.record(judge_reading(metric(), Reading(0.0, "q")), at_deadline=False).outcome is (
        Outcome.CONTINUE
    )
    assert r.at_deadline(0)  # the second measurement completes it


def test_start_runs_splits_a_fleets_region_metric_only() -> None:
    by_region = MetricPolicy(
        name="a",
        provider="prometheus",
        address="http://p:9090",
        query='x{region="{{region}}"}',
        success_condition="true",
    )
    policy = AnalysisPolicy(metrics=(by_region, metric(), MetricPolicy("r", "router")))
    fleet = start_runs(policy, now=0, deadline=60, regions=["eu", "us"])
    assert sorted(fleet) == ["a@eu", "a@us", "error-rate", "r"]
    assert fleet["a@us"].region == "us" and fleet["error-rate"].region is None
    assert sorted(start_runs(policy, now=0, deadline=60, regions=None)) == ["a", "error-rate", "r"]
