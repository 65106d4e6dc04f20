"""``[[analysis.metrics]]`` in shipyard.toml (and a stage's ``analysis.metrics``): what is
accepted, and every bad input refused at validation with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.analysis.policy import AnalysisPolicy
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import AnalysisSettings, DeploymentRequest
from shipyard.errors import ManifestError

BASE = '[service]\nname = "api"\n[run]\ncommand = "python3 app.py"\n[analysis]\n'

#: The design's example, as a user writes it (one long PromQL line).
ERROR_RATE = """
[[analysis.metrics]]
name = "error-rate"
provider = "prometheus"
address = "http://127.0.0.1:9090"
query = 'sum(rate(shipyard_router_responses_total{service="{{service}}",revision="{{canary}}",code="5xx"}[{{window}}])) / sum(rate(shipyard_router_requests_total{service="{{service}}",revision="{{canary}}"}[{{window}}]))'
success_condition = "result < 0.05"
failure_condition = "result >= 0.2"
interval_seconds = 5
count = 0
failure_limit = 0
consecutive_error_limit = 4
inconclusive_limit = 0

[[analysis.metrics]]
name = "p99"
provider = "web"
url = "http://metrics.internal/api/{{region}}/{{canary}}"
json_path = "$.data.p99_ms"
success_condition = "result < 250"
timeout_seconds = 3

[[analysis.metrics]]
name = "router"
provider = "router"
interval_seconds = 10
"""  # noqa: E501


def test_the_design_example_is_accepted_and_resolved_into_the_plan_policy() -> None:
    m = parse_manifest(BASE + "interval_seconds = 10\nfailure_limit = 1\n" + ERROR_RATE)
    assert m.analysis.metrics is not None
    assert [x.name for x in m.analysis.metrics] == ["error-rate", "p99", "router"]
    policy = AnalysisPolicy.resolve(m.analysis)
    prom, web, router = policy.metrics
    assert router.provider == "router" and router.interval_seconds == 10
    assert (prom.provider, prom.interval_seconds, prom.count) == ("prometheus", 5, 0)
    assert web.timeout_seconds == 3 and prom.timeout_seconds == 10
    # a metric's own limits win; unset ones inherit the [analysis] table's
    assert policy.for_metric(prom).failure_limit == 0
    assert policy.for_metric(web).failure_limit == 1
    assert policy.for_metric(web).interval_seconds == 10
    assert policy.for_metric(prom).interval_seconds == 5
    assert AnalysisPolicy.from_dict(policy.to_dict()) == policy


def test_a_stage_list_replaces_the_manifest_list_whole() -> None:
    m = parse_manifest(BASE + ERROR_RATE)
    stage = AnalysisSettings.model_validate({"metrics": [{"name": "r", "provider": "router"}]})
    assert [x.name for x in AnalysisPolicy.resolve(m.analysis, stage).metrics] == ["r"]
    assert len(AnalysisPolicy.resolve(m.analysis, AnalysisSettings()).metrics) == 3
    assert AnalysisPolicy.resolve(None, None).metrics == ()


def test_a_stage_of_an_api_request_takes_metrics_too() -> None:
    req = DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd1234"},
            "target": {"service_name": "api", "region": "local"},
            "strategy": {
                "Canary": {
                    "stages": [
                        {
                            "weight": 10,
                            "analysis": {
                                "metrics": [
                                    {
                                        "name": "e",
                                        "provider": "web",
                                        "url": "https://x.example/{{canary}}",
                                        "json_path": "$.v",
                                        "success_condition": "result == 0",
                                    }
                                ]
                            },
                        }
                    ]
                }
            },
        }
    )
    assert req.strategy is not None


def metric(**fields: object) -> str:
    body = {"name": '"m"', **{k: v for k, v in fields.items()}}
    return "[[analysis.metrics]]\n" + "".join(f"{k} = {v}\n" for k, v in body.items())


PROM = {
    "provider": '"prometheus"',
    "address": '"http://127.0.0.1:9090"',
    "query": '"up"',
    "success_condition": '"result == 1"',
}


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        pytest.param(metric(**{**PROM, "query": '"up{x=\\"{{canry}}\\"}"'}),
                     r"unknown placeholder \{\{canry\}\} in query", id="unknown-placeholder"),
        pytest.param(metric(**{**PROM, "success_condition": '"result.real < 1"'}),
                     r"success_condition: .*attribute access", id="attribute"),
        pytest.param(metric(**{**PROM, "failure_condition": '"__import__(\'os\')"'}),
                     "failure_condition", id="call"),
        pytest.param(metric(**{**PROM, "success_condition": '"result <"'}),
                     "not a valid condition", id="syntax"),
        pytest.param(metric(**{**PROM, "success_condition": '"rate < 1"'}),
                     "unknown name 'rate'", id="unknown-name"),
        pytest.param(metric(**{k: v for k, v in PROM.items() if k != "address"}),
                     r"analysis\.metrics\.0\.prometheus\.address: Field required", id="no-address"),
        pytest.param(metric(**{k: v for k, v in PROM.items() if k != "success_condition"}),
                     r"prometheus\.success_condition: Field required", id="no-success-condition"),
        pytest.param(metric(**{**PROM, "address": '"http://user:secret@prom:9090"'}),
                     "must not carry credentials", id="credentials"),
        pytest.param(metric(**{**PROM, "address": '"file:///etc/passwd"'}),
                     "http:// or https://", id="not-http"),
        pytest.param(metric(**{**PROM, "url": '"http://x/"'}),
                     r"prometheus\.url: Extra inputs are not permitted", id="prometheus-with-url"),
        pytest.param(metric(provider='"router"', success_condition='"true"'),
                     r"router\.success_condition: Extra inputs are not permitted",
                     id="router-with-condition"),
        pytest.param(metric(provider='"web"', url='"http://x/"', json_path='"$.[["',
                            success_condition='"true"'),
                     "json_path is not a valid JSONPath", id="bad-jsonpath"),
        pytest.param(metric(provider='"web"', url='"http://x/{{nope}}"', json_path='"$.a"',
                            success_condition='"true"'),
                     r"unknown placeholder \{\{nope\}\} in url", id="url-placeholder"),
        pytest.param(metric(provider='"datadog"'), "provider", id="unknown-provider"),
        pytest.param(metric(provider='"router"', name='"has space"'), "name", id="bad-name"),
        pytest.param(metric(provider='"router"') + metric(provider='"router"'),
                     "two metrics are named 'm'", id="duplicate"),
        pytest.param(metric(provider='"router"') + metric(provider='"router"', name='"n"'),
                     'at most one metric may have provider = "router"', id="two-routers"),
        pytest.param(metric(**PROM, interval_seconds="0"), "interval_seconds", id="zero-interval"),
        pytest.param(metric(**PROM, timeout_seconds="120"), "timeout_seconds", id="long-timeout"),
        pytest.param(metric(**PROM, headers='{ authorization = "x" }'), "headers",
                     id="no-headers"),
        pytest.param("metrics = []\n", "analysis.metrics", id="empty-list"),
    ],
)  # fmt: skip
def test_bad_metrics_are_manifest_errors_naming_the_field(toml: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle):
        parse_manifest(BASE + toml)


def test_the_documented_example_is_a_valid_manifest() -> None:
    """docs/analysis-metrics.md's example parses as written (the doc cannot drift)."""
    doc = (Path(__file__).parents[2] / "docs" / "analysis-metrics.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    m = parse_manifest('[service]\nname = "api"\n[run]\ncommand = "python3 app.py"\n' + example)
    assert m.analysis.metrics is not None
    assert [x.provider for x in m.analysis.metrics] == ["prometheus", "web", "router"]
