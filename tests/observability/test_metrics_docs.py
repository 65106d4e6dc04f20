"""The documents that describe ``/metrics`` are checked against it: docs/metrics.md names every
series exposed, the Grafana dashboard's queries are valid PromQL (``promtool check rules`` on
them wrapped as recording rules) over series that exist, and docs/prometheus/alerts.yml passes
``promtool check rules`` and its own unit tests (``promtool test rules``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shipyard.api.metrics import MetricsEndpoint
from shipyard.runtime.fake import FakeRuntime
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine
from tests.prometheus import available, promtool

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "shipyard-dashboard.json"
ALERTS = DOCS / "prometheus" / "alerts.yml"
#: Grafana's variables, as a query sees them once Grafana has substituted them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1d", "$service": ".*", "$region": ".*"}
SERIES = re.compile(r"\bshipyard_[a-z0-9_]+\b")


@pytest.fixture(autouse=True)
def needs_promtool() -> None:
    assert available(), "apt-get install prometheus (scripts/bootstrap.sh does)"


async def exposed(tmp_path: Path) -> dict[str, str]:
    """family name -> type, from what ``/metrics`` renders (every family is there, with its
    ``# TYPE`` line, even before it has a sample)."""
    store = AsyncStore(Store(open_engine(None, tmp_path)))
    body = (await MetricsEndpoint().render(store, {"local": FakeRuntime("local")})).decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M))


def sample_names(families: dict[str, str]) -> set[str]:
    names: set[str] = set()
    for name, kind in families.items():
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        names.update(name + s for s in suffixes)
    return names


def family(sample: str) -> str:
    """The family a sample name belongs to (a histogram's ``_bucket`` -> the histogram)."""
    return re.sub(r"_(bucket|count|sum)$", "", sample)


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query and template variable of the dashboard."""
    found = [
        (f"panel {p['id']} ({p['title']}) {t['refId']}", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']}", var["query"]["query"]))
    return found


def substituted(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


async def test_docs_metrics_md_names_every_series_and_its_type(tmp_path: Path) -> None:
    text = (DOCS / "metrics.md").read_text()
    documented = dict(re.findall(r"^\| `(shipyard_[a-z0-9_]+)` \| (\w+) \|", text, re.M))
    families = await exposed(tmp_path)
    assert documented == families


async def test_every_dashboard_query_is_promql_over_exposed_series(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p.get("targets") for p in panels), "a panel without a query"
    queries = expressions(dashboard)
    names = sample_names(await exposed(tmp_path))
    for where, expr in queries:
        unknown = set(SERIES.findall(expr)) - names
        assert not unknown, f"{where} names series /metrics does not expose: {unknown}"
    # label_values(...) is Grafana's, not PromQL: its series argument is what promtool checks.
    rules = [
        {
            "record": f"dashboard:query_{n}",
            "expr": substituted(re.sub(r"^label_values\((.*), \w+\)$", r"\1", expr)),
        }
        for n, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
    # The dashboard covers every family /metrics exposes.
    covered = {family(name) for _, expr in queries for name in SERIES.findall(expr)}
    assert set(await exposed(tmp_path)) <= covered


async def test_alert_rules_are_valid_tested_and_name_exposed_series(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERTS.with_name("alerts_test.yml")))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    unknown = set(SERIES.findall(ALERTS.read_text())) - sample_names(await exposed(tmp_path))
    assert not unknown, f"alerts.yml names series /metrics does not expose: {unknown}"
