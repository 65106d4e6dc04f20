"""``[[analysis.metrics]]`` through the real executor on fakes: the metrics listed *are* the
analysis, each with Argo Rollouts' semantics (failure_limit, consecutive_error_limit, a success
resetting the error count, inconclusive pausing for a human, no data never passing), ``count``,
a fleet's ``{{region}}``, measurements in the record and the audit log, and resume after a
restart. Providers are scripted fakes (``Deps.metric_providers``); the real ones are tested
against real servers in tests/analysis/test_providers.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from shipyard.analysis.metrics import Reading
from shipyard.analysis.policy import MetricPolicy
from shipyard.analysis.providers import MetricProvider, MetricProviderError
from shipyard.build.fake import FakeBuilder
from shipyard.domain import placeholders
from shipyard.domain.expressions import Value
from shipyard.domain.manifest import parse_manifest
from shipyard.runtime.fake import TrafficProfile
from tests.orchestrator.world import Doc, PipelineWorld, progressive, restart

Answer = Value | None | Exception


class ScriptedProvider:
    """Answers each read with the next of ``script`` (the last repeats): a value, None (no
    data) or an exception to raise; ``calls`` keeps what it was asked, substituted."""

    def __init__(self, script: Sequence[Answer] | Callable[[Mapping[str, str | None]], Answer]):
        self.script = script
        self.calls: list[tuple[str, str]] = []

    async def read(self, metric: MetricPolicy, values: Mapping[str, str | None]) -> Reading:
        template = metric.query or metric.url or ""
        sent = placeholders.render(template, values, placeholders.promql_string)
        self.calls.append((metric.name, sent))
        if callable(self.script):
            got = self.script(values)
        else:
            n = sum(1 for name, _ in self.calls if name == metric.name) - 1
            got = self.script[min(n, len(self.script) - 1)]
        if isinstance(got, Exception):
            raise got
        return Reading(got, sent)


def use(world: PipelineWorld, **providers: MetricProvider) -> None:
    world.pipeline.deps.metric_providers = providers


QUERY = (
    'sum(rate(errors{service="{{service}}",revision="{{canary}}"}[{{window}}])) / '
    'sum(rate(requests{service="{{service}}",revision="{{canary}}"}[{{window}}]))'
)


def prom(name: str = "error-rate", **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "prometheus",
        "address": "http://prometheus.invalid:9090",
        "query": QUERY,
        "success_condition": "result < 0.05",
        **kw,
    }


def canary(metrics: list[dict[str, Any]], seconds: float = 60, **analysis: Any) -> dict[str, Any]:
    stage = {
        "weight": 20,
        "duration_seconds": seconds,
        "analysis": {"metrics": metrics, **analysis},
    }
    return {"Canary": {"stages": [stage], "scale_down_delay_seconds": 0}}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def measured(world: PipelineWorld, doc: Doc) -> list[dict[str, Any]]:
    return [
        r.detail for r in await world.events(doc["id"]) if r.event_type == "analysis.measurement"
    ]


async def test_a_failing_promql_metric_aborts_and_the_router_check_does_not_run(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    provider = ScriptedProvider([0.01, 0.3])
    use(world, prometheus=provider)
    doc = await world.submit("bbbb2222", canary([prom()]))
    green = world.revision("bbbb2222", doc)
    world.profile(green, error_rate=0.5)  # the router would fail it at once: it is not asked
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["type"] == "AnalysisFailed"
    assert final["error"]["metric"] == "error-rate"
    assert (
        "metric error-rate: 1 failed measurement(s) exceed failure_limit 0"
        in (final["error"]["message"])
    )
    assert (
        "success_condition `result < 0.05` does not hold for result = 0.3"
        in (final["error"]["message"])
    )
    assert world.weights() == {stable: 100}
    events = await measured(world, final)
    assert [(e["metric"], e["verdict"], e["outcome"]) for e in events] == [
        ("error-rate", "pass", "continue"),
        ("error-rate", "fail", "failed"),
    ]
    sent = events[0]["query"]
    assert f'revision="{green}"' in sent and "[10s]" in sent and 'service="api"' in sent
    assert events[0]["provider"] == "prometheus" and events[0]["value"] == 0.01
    stage = next(s for s in final["stages"] if s["name"] == "analysis_1")
    assert [m["value"] for m in stage["detail"]["measurements"]] == [0.01, 0.3]
    assert stage["detail"]["metrics"]["error-rate"]["failed"] == 1
    assert final["metrics"]["abort_latency_ms"] is not None


async def test_listed_metrics_passing_promote_even_when_the_router_would_fail(
    world: PipelineWorld,
) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([0.01]))
    doc = await world.submit("cccc3333", canary([prom()], seconds=60))
    world.profile(world.revision("cccc3333", doc), error_rate=0.5)
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    events = await measured(world, final)
    assert len(events) == 6 and {e["verdict"] for e in events} == {"pass"}  # every 10 s, 60 s
    assert {e["metric"] for e in events} == {"error-rate"}
    stage = next(s for s in final["stages"] if s["name"] == "analysis_1")
    assert stage["detail"]["verdict"] == "pass"
    assert stage["detail"]["metrics"]["error-rate"]["passed"] == 6


async def test_the_router_check_runs_when_listed_as_a_metric(world: PipelineWorld) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([0.01]))
    metrics = [prom(), {"name": "router", "provider": "router"}]
    doc = await world.submit("dddd4444", canary(metrics))
    world.profile(world.revision("dddd4444", doc), error_rate=0.5)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    assert final["error"]["metric"] == "router"
    assert "success rate" in final["error"]["message"]
    events = await measured(world, final)
    router = [e for e in events if e["metric"] == "router"]
    assert router[-1]["provider"] == "router" and router[-1]["verdict"] == "fail"
    assert router[-1]["requests"] > 0


async def test_failure_limit_counts_per_metric(world: PipelineWorld) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([0.3, 0.01, 0.3, 0.3]))
    doc = await world.deploy("eeee5555", canary([prom(failure_limit=2)], seconds=600))
    assert doc["status"] == "RolledBack"
    assert [e["verdict"] for e in await measured(world, doc)] == ["fail", "pass", "fail", "fail"]
    assert "3 failed measurement(s) exceed failure_limit 2" in doc["error"]["message"]


async def test_consecutive_errors_abort_and_a_success_resets_them(world: PipelineWorld) -> None:
    await world.first()
    down = MetricProviderError("prometheus at http://prometheus.invalid:9090 is unreachable")
    # two errors, a success, two errors, a success...: never three in a row -> passes
    script: list[Answer] = [down, down, 0.01, down, down, 0.01]
    resetting = ScriptedProvider(script)
    use(world, prometheus=resetting)
    ok = await world.deploy("abab1111", canary([prom(consecutive_error_limit=2)]))
    assert ok["status"] == "Success", ok.get("error")
    verdicts = [e["verdict"] for e in await measured(world, ok)]
    assert verdicts == ["error", "error", "pass", "error", "error", "pass"]
    use(world, prometheus=ScriptedProvider([down]))
    failed = await world.deploy("acac2222", canary([prom(consecutive_error_limit=2)]))
    assert failed["status"] == "RolledBack"
    assert (
        "3 consecutive measurement errors exceed consecutive_error_limit 2"
        in (failed["error"]["message"])
    )
    assert "is unreachable" in failed["error"]["message"]


async def test_inconclusive_pauses_for_a_human_who_promotes(world: PipelineWorld) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([0.1]))  # neither < 0.05 nor >= 0.2
    metric = prom(failure_condition="result >= 0.2")
    doc = await world.submit("adad3333", canary([metric], seconds=600))
    paused = await world.until(doc["id"], "Paused")
    assert (
        "metric error-rate: 1 inconclusive measurement(s) exceed inconclusive_limit 0"
        in (paused["progress"]["paused"])
    )
    await world.promote(doc["id"], "bob")
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    assert [e["verdict"] for e in await measured(world, final)] == ["inconclusive"]


@pytest.mark.parametrize(
    ("policy", "answer", "status"),
    [
        pytest.param("fail", None, "RolledBack", id="no-series-fail"),
        pytest.param("fail", float("nan"), "RolledBack", id="nan-fail"),
        pytest.param("extend", [], "RolledBack", id="empty-extend-then-fail"),
    ],
)
async def test_no_data_is_never_a_pass(
    world: PipelineWorld, policy: str, answer: Value | None, status: str
) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([answer]))
    analysis = {"insufficient_data": policy, "max_extensions": 2}
    final = await world.deploy("aeae4444", canary([prom()], seconds=30, **analysis))
    assert final["status"] == status
    assert "insufficient data" in final["error"]["message"]
    assert (
        "the query returned no data: does it select the canary's series"
        in (final["error"]["message"])
    )
    assert {e["verdict"] for e in await measured(world, final)} == {"insufficient_data"}


async def test_no_data_with_the_pause_policy_waits_for_a_human(world: PipelineWorld) -> None:
    await world.first()
    use(world, prometheus=ScriptedProvider([None]))
    doc = await world.submit("afaf5555", canary([prom()], insufficient_data="pause"))
    await world.until(doc["id"], "Paused")
    await world.abort(doc["id"], "carol")
    assert (await world.wait(doc["id"]))["status"] == "RolledBack"


async def test_count_holds_the_stage_until_the_metric_has_its_measurements(
    world: PipelineWorld,
) -> None:
    """count = 4 every 10 s in a 10 s stage: the stage is held for four measurements (40 s);
    a metric without count is measured until the stage's (original) deadline."""
    await world.first()
    use(world, prometheus=ScriptedProvider([0.01]), web=ScriptedProvider([1]))
    web = {
        "name": "health",
        "provider": "web",
        "url": "http://status.invalid/{{canary}}",
        "json_path": "$.ok",
        "success_condition": "result == 1",
        "interval_seconds": 5,
    }
    t0 = world.clock.now()
    final = await world.deploy("baba6666", canary([prom(count=4), web], seconds=10))
    assert final["status"] == "Success", final.get("error")
    events = await measured(world, final)
    assert sum(e["metric"] == "error-rate" for e in events) == 4
    assert sum(e["metric"] == "health" for e in events) == 2  # 5 s and 10 s
    assert world.clock.now() - t0 >= 40


async def test_stage_metrics_replace_the_manifests(tmp_path: Path) -> None:
    """The manifest lists a failing metric; a stage listing its own replaces the list."""
    manifest = progressive(1) + (
        "[[analysis.metrics]]\n"
        'name = "from-manifest"\nprovider = "web"\nurl = "http://x.invalid/"\n'
        'json_path = "$.v"\nsuccess_condition = "result == 0"\n'
    )
    w = PipelineWorld(tmp_path, builder=FakeBuilder(manifest=parse_manifest(manifest)), rps=100)
    await w.pipeline.start()
    try:
        use(w, web=ScriptedProvider([1]), prometheus=ScriptedProvider([0.0]))
        await w.first()
        failed = await w.deploy(
            "caca7777", {"Canary": {"stages": [{"weight": 10, "duration_seconds": 20}]}}
        )
        assert failed["status"] == "RolledBack"
        assert failed["error"]["metric"] == "from-manifest"
        passed = await w.deploy("cbcb8888", canary([prom()], seconds=20))
        assert passed["status"] == "Success", passed.get("error")
        assert {e["metric"] for e in await measured(w, passed)} == {"error-rate"}
    finally:
        await w.pipeline.stop()


async def test_restart_mid_analysis_resumes_each_metrics_tallies_and_deadline(
    world: PipelineWorld,
) -> None:
    await world.first()
    provider = ScriptedProvider([0.01])
    use(world, prometheus=provider)
    doc = await world.submit("dcdc9999", canary([prom(failure_limit=1)], seconds=600))

    def metric_measurements(d: Doc) -> int:
        runs = (d["progress"].get("analysis") or {}).get("metrics", {})
        return int(runs.get("error-rate", {}).get("run", {}).get("measurements", 0))

    await world.until(doc["id"], lambda d: metric_measurements(d) >= 7)
    await restart(world)
    use(world, prometheus=provider)
    t_restart = world.clock.now()
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    assert world.clock.now() - t_restart < 600  # the stage did not start over
    stage = next(s for s in final["stages"] if s["name"] == "analysis_1")
    # 60 windows of 10 s in all: those before the restart counted once, none taken twice
    assert stage["detail"]["metrics"]["error-rate"]["measurements"] == 60
    assert "deployment.resumed" in [r.event_type for r in await world.events(doc["id"])]


async def test_a_provider_missing_from_the_control_plane_is_a_measurement_error(
    world: PipelineWorld,
) -> None:
    await world.first()
    use(world)  # no providers at all
    final = await world.deploy("eded1010", canary([prom(consecutive_error_limit=0)]))
    assert final["status"] == "RolledBack"
    assert "no prometheus provider is configured" in final["error"]["message"]


async def test_region_placeholder_measures_each_region_of_a_fleet(tmp_path: Path) -> None:
    regions = ("eu", "us")
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0, regions=regions)
    await w.pipeline.start()
    try:

        def by_region(values: Mapping[str, str | None]) -> Answer:
            return 0.3 if values["region"] == "us" else 0.01

        provider = ScriptedProvider(by_region)
        use(w, prometheus=provider)
        first = await w.submit(
            "aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}}, regions=regions
        )
        stable = await w.wait(first["id"])
        assert stable["status"] == "Success", stable.get("error")
        query = 'max(err{region="{{region}}",revision="{{canary}}"})'
        submitted = await w.submit(
            "fefe1111", canary([prom(query=query)], seconds=60), regions=regions
        )
        final = await w.wait(submitted["id"])
        assert final["status"] == "RolledBack"
        assert final["error"]["region"] == "us"
        assert "in region us: metric error-rate" in final["error"]["message"]
        sent = {q for _, q in provider.calls}
        assert any('region="eu"' in q for q in sent) and any('region="us"' in q for q in sent)
        events = await measured(w, final)
        assert {e["region"] for e in events} == {"eu", "us"}
    finally:
        await w.pipeline.stop()


def test_scripted_provider_repeats_its_last_answer() -> None:
    """The fake keeps its contract: answers in order, then the last one again."""
    p = ScriptedProvider([1, 2])
    m = MetricPolicy(
        name="m", provider="web", url="http://x/", json_path="$", success_condition="true"
    )
    got = [asyncio.run(p.read(m, {})).value for _ in range(3)]
    assert got == [1, 2, 2]


async def test_the_router_metric_of_a_fleet_still_judges_each_region(tmp_path: Path) -> None:
    """Listed as a metric, the router check keeps its fleet behaviour: us's canary fails its own
    window while the merged fleet's (eu carries most traffic) would pass."""
    regions = ("eu", "us")
    w = PipelineWorld(tmp_path, replicas=1, regions=regions)
    w.fakes["eu"].router.rps = 1000.0
    w.fakes["us"].router.rps = 60.0
    await w.pipeline.start()
    try:
        use(w, prometheus=ScriptedProvider([0.0]))
        first = await w.submit(
            "aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}}, regions=regions
        )
        assert (await w.wait(first["id"]))["status"] == "Success"
        metrics = [{"name": "router", "provider": "router"}, prom()]
        doc = await w.submit("abcd2222", canary(metrics, seconds=600), regions=regions)
        green = w.revision("abcd2222", doc)
        w.fakes["us"].router.profiles[green] = TrafficProfile(error_rate=0.05)
        final = await w.wait(doc["id"])
        assert final["status"] == "RolledBack"
        assert final["error"]["region"] == "us" and final["error"]["metric"] == "router"
        assert "in region us: metric router" in final["error"]["message"]
    finally:
        await w.pipeline.stop()
