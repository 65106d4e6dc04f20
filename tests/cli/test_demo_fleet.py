"""``cli/demo_fleet.py``'s pure helpers: the outside skew the demo and bench/bench_fleet.py
print (from the load generators' first-seen times) and the agents' loopback addresses. The demo
itself runs real processes: ``make demo-fleet``; the same story is asserted by
``tests/e2e/test_fleet.py``."""

from __future__ import annotations

import pytest

from shipyard.cli.demo_fleet import agent_host, outside_skew
from shipyard.cli.loadgen import LoadReport


def report(first_seen: dict[str, float]) -> LoadReport:
    r = LoadReport()
    r.first_seen.update(first_seen)
    return r


@pytest.mark.parametrize(
    ("seen", "revision", "expected_ms", "regions_seen"),
    [
        pytest.param(
            {"a": {"r1": 1.0, "r2": 10.000}, "b": {"r1": 1.0, "r2": 10.040}},
            "r2",
            40.0,
            {"a", "b"},
            id="two-regions-40ms-apart",
        ),
        pytest.param(
            {"a": {"r2": 5.0}, "b": {"r2": 5.0}, "c": {"r2": 5.0}},
            "r2",
            0.0,
            {"a", "b", "c"},
            id="together",
        ),
        pytest.param(
            {"a": {"r2": 5.0}, "b": {"r1": 4.0}},
            "r2",
            None,
            {"a"},
            id="one-region-never-answered-it",
        ),
        pytest.param(
            {"a": {"abc1234-dead": 2.0}, "b": {"abc1234-dead": 2.5}},
            "abc1234-deadbeef",
            500.0,
            {"a", "b"},
            id="router-header-is-a-prefix-of-the-revision",
        ),
        pytest.param(
            {"a": {"": 1.0}, "b": {"": 1.0}},
            "r2",
            None,
            set(),
            id="answers-without-a-revision-header-do-not-count",
        ),
    ],
)
def test_outside_skew(
    seen: dict[str, dict[str, float]],
    revision: str,
    expected_ms: float | None,
    regions_seen: set[str],
) -> None:
    times, skew = outside_skew({k: report(v) for k, v in seen.items()}, revision)
    assert set(times) == regions_seen
    if expected_ms is None:
        assert skew is None
    else:
        assert skew == pytest.approx(expected_ms)


def test_agent_hosts_are_loopback_aliases_from_127_0_0_2() -> None:
    assert [agent_host(i) for i in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with pytest.raises(ValueError, match="no loopback address"):
        agent_host(250)
