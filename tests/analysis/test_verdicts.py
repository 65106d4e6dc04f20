"""Analysis verdicts and Argo's limit semantics, table-driven."""

from __future__ import annotations

import pytest

from shipyard.analysis.policy import AnalysisPolicy, LoadPolicy
from shipyard.analysis.verdicts import (
    AnalysisRun,
    CountersReset,
    Measurement,
    Outcome,
    Verdict,
    judge,
    measurement_error,
    metrics_from_dict,
    window,
)
from shipyard.routing.metrics import RevisionCounters, RevisionMetrics


def traffic(revision: str, ok: int, errors: int = 0, latency_s: float = 0.002) -> RevisionMetrics:
    c = RevisionCounters(revision)
    for _ in range(ok):
        c.observe(200, latency_s)
    for _ in range(errors):
        c.observe(503, latency_s)
    return c.snapshot()


POLICY = AnalysisPolicy(min_success_rate=0.99, max_p99_latency_ms=100, min_requests=50)


@pytest.mark.parametrize(
    ("canary", "stable", "policy", "verdict", "reason"),
    [
        (traffic("c", 100), None, POLICY, Verdict.PASS, ""),
        (traffic("c", 90, 10), None, POLICY, Verdict.FAIL, "success rate 0.9000"),
        (traffic("c", 100, latency_s=0.4), None, POLICY, Verdict.FAIL, "p99"),
        (
            traffic("c", 10),
            None,
            POLICY,
            Verdict.INSUFFICIENT_DATA,
            "10 requests seen, 50 needed (min_requests)",
        ),
        (None, None, POLICY, Verdict.ERROR, "no metrics"),
        (
            traffic("c", 100),
            traffic("s", 5),
            AnalysisPolicy(min_requests=50, compare_with_stable=True),
            Verdict.INCONCLUSIVE,
            "cannot compare",
        ),
        (
            traffic("c", 95, 5),
            traffic("s", 100),
            AnalysisPolicy(min_success_rate=None, min_requests=50, compare_with_stable=True),
            Verdict.FAIL,
            "below stable's",
        ),
        (
            traffic("c", 100, latency_s=0.08),
            traffic("s", 100, latency_s=0.02),
            AnalysisPolicy(min_requests=50, compare_with_stable=True),
            Verdict.FAIL,
            "x stable's",
        ),
        (
            traffic("c", 100, latency_s=0.003),
            traffic("s", 100, latency_s=0.001),
            AnalysisPolicy(min_requests=50, compare_with_stable=True),
            Verdict.PASS,
            "",
        ),
    ],
    ids=[
        "healthy",
        "5xx",
        "slow",
        "too-little-traffic",
        "no-metrics",
        "stable-too-quiet",
        "worse-than-stable",
        "slower-than-stable",
        "within-histogram-slack",
    ],
)
def test_judge(
    canary: RevisionMetrics | None,
    stable: RevisionMetrics | None,
    policy: AnalysisPolicy,
    verdict: Verdict,
    reason: str,
) -> None:
    m = judge(canary, stable, policy)
    assert m.verdict is verdict, m
    assert reason in " ".join(m.reasons)


PASS = Measurement(Verdict.PASS)
FAIL = Measurement(Verdict.FAIL, ("bad",))
INCONCLUSIVE = Measurement(Verdict.INCONCLUSIVE, ("?",))
LOW = Measurement(Verdict.INSUFFICIENT_DATA, ("few",))
ERROR = measurement_error("down")


# (policy, measurements, index of the first one taken at the stage's deadline, outcomes)
RUNS = {
    "all-pass": (AnalysisPolicy(), [PASS, PASS], 1, ["continue", "passed"]),
    "one-failure-exceeds-limit-0": (AnalysisPolicy(), [FAIL], 0, ["failed"]),
    "failures-within-limit": (
        AnalysisPolicy(failure_limit=1),
        [FAIL, PASS],
        1,
        ["continue", "passed"],
    ),
    "failures-exceed-limit-1": (
        AnalysisPolicy(failure_limit=1),
        [FAIL, FAIL],
        1,
        ["continue", "failed"],
    ),
    "errors-counted-consecutively": (
        AnalysisPolicy(consecutive_error_limit=1),
        [ERROR, PASS, ERROR, ERROR],
        9,
        ["continue", "continue", "continue", "failed"],
    ),
    "error-at-deadline-extends": (AnalysisPolicy(), [PASS, ERROR], 1, ["continue", "extended"]),
    "inconclusive-pauses": (AnalysisPolicy(), [INCONCLUSIVE], 0, ["paused"]),
    "inconclusive-within-limit": (
        AnalysisPolicy(inconclusive_limit=1),
        [INCONCLUSIVE, PASS],
        1,
        ["continue", "passed"],
    ),
    "insufficient-fail-policy": (AnalysisPolicy(insufficient_data="fail"), [LOW], 0, ["failed"]),
    "insufficient-pause-policy": (AnalysisPolicy(insufficient_data="pause"), [LOW], 0, ["paused"]),
    "insufficient-extend-is-bounded": (
        AnalysisPolicy(max_extensions=2),
        [LOW, LOW, LOW, LOW],
        1,
        ["continue", "extended", "extended", "failed"],
    ),
    "insufficient-extend-then-pass": (
        AnalysisPolicy(max_extensions=2),
        [LOW, LOW, PASS],
        1,
        ["continue", "extended", "passed"],
    ),
}


@pytest.mark.parametrize(("policy", "sequence", "deadline", "outcomes"), RUNS.values(), ids=RUNS)
def test_run_decisions(
    policy: AnalysisPolicy, sequence: list[Measurement], deadline: int, outcomes: list[str]
) -> None:
    run = AnalysisRun(policy)
    got = [run.record(m, at_deadline=i >= deadline).outcome.value for i, m in enumerate(sequence)]
    assert got == outcomes
    assert AnalysisRun.from_dict(run.to_dict()) == run


def test_never_a_silent_pass_without_data() -> None:
    run = AnalysisRun(AnalysisPolicy(max_extensions=0))
    assert run.record(LOW, at_deadline=True).outcome is Outcome.FAILED


def test_windows_are_differences_of_snapshots() -> None:
    c = RevisionCounters("c")
    for _ in range(10):
        c.observe(200, 0.001)
    earlier = {"c": c.snapshot().to_dict()}
    for _ in range(5):
        c.observe(500, 0.3)
    later = {"c": c.snapshot().to_dict()}
    w = window(later, earlier, "c")
    assert w is not None
    assert (w.requests, w.status_5xx, w.success_rate) == (5, 5, 0.0)
    assert metrics_from_dict(later["c"]) == c.snapshot()
    assert window(later, {}, "c") == c.snapshot()
    assert window(later, earlier, "absent") is None
    with pytest.raises(CountersReset):
        window(earlier, later, "c")


def test_policy_resolution_and_round_trip() -> None:
    from shipyard.domain.models import AnalysisSettings

    p = AnalysisPolicy.resolve(
        AnalysisSettings(min_requests=5, insufficient_data="pause"),
        None,
        AnalysisSettings(min_requests=7),
    )
    assert (p.min_requests, p.insufficient_data, p.failure_limit) == (7, "pause", 0)
    assert AnalysisPolicy.from_dict(p.to_dict()) == p


LOAD = LoadPolicy(rps=20, path="/ping")


@pytest.mark.parametrize(
    ("policy", "sequence", "deadline", "outcome", "says"),
    [
        pytest.param(
            AnalysisPolicy(min_requests=50, interval_seconds=10, max_extensions=1),
            [traffic("c", 3)] * 3,
            1,
            Outcome.FAILED,
            [
                "insufficient data: 3 requests seen, 50 needed (min_requests), still after 1 "
                "extension(s) of 10 s (max_extensions)",
                "needs 50 requests per 10 s window",
                "[analysis] load = { rps = 10 }",
                "lower min_requests",
            ],
            id="extend-exhausted-suggests-a-load",
        ),
        pytest.param(
            AnalysisPolicy(min_requests=20, interval_seconds=30, insufficient_data="pause"),
            [traffic("c", 0)],
            0,
            Outcome.PAUSED,
            [
                "insufficient data: 0 requests seen, 20 needed (min_requests) (policy: pause)",
                "[analysis] load = { rps = 2 }",
            ],
            id="pause-says-seen-and-needed",
        ),
        pytest.param(
            AnalysisPolicy(min_requests=20, insufficient_data="fail", load=LOAD),
            [traffic("c", 7)],
            0,
            Outcome.FAILED,
            [
                "7 requests seen, 20 needed (min_requests) (policy: fail)",
                "the built-in load (20 rps to /ping) did not get 20 answers per 10 s window",
            ],
            id="with-a-load-asks-whether-the-canary-answers",
        ),
    ],
)
def test_insufficient_data_verdicts_say_seen_needed_and_what_to_do(
    policy: AnalysisPolicy,
    sequence: list[RevisionMetrics],
    deadline: int,
    outcome: Outcome,
    says: list[str],
) -> None:
    run = AnalysisRun(policy)
    decisions = [
        run.record(judge(m, None, policy), at_deadline=i >= deadline)
        for i, m in enumerate(sequence)
    ]
    assert decisions[-1].outcome is outcome
    for text in says:
        assert text in decisions[-1].reason
    measured = judge(sequence[-1], None, policy).to_dict()
    assert (measured["requests"], measured["needed"]) == (
        sequence[-1].responses,
        policy.min_requests,
    )


def test_load_settings_resolve_and_round_trip() -> None:
    from shipyard.domain.models import AnalysisSettings, LoadSettings

    p = AnalysisPolicy.resolve(
        AnalysisSettings(load=LoadSettings(rps=5)),
        AnalysisSettings(min_requests=7, load=LoadSettings(rps=20, path="/ping")),
    )
    assert p.load == LOAD
    assert AnalysisPolicy.from_dict(p.to_dict()) == p
    assert AnalysisPolicy.resolve(AnalysisSettings(min_requests=7)).load is None
