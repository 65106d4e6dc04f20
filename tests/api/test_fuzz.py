"""Schemathesis against the API's own OpenAPI schema, in-process (ASGI), with every check.

What it proves: no request the schema allows (or, in negative mode, forbids) makes the server
answer 5xx, and every answer's status, content type, headers and body are the ones the schema
declares for that route (``not_a_server_error``, ``status_code_conformance``,
``content_type_conformance``, ``response_headers_conformance``, ``response_schema_conformance``,
``negative_data_rejection``, ``positive_data_acceptance``, ``ignored_auth``, ...: all of
schemathesis' checks, none excluded). It runs twice: with a token holding every permission, and
with no token at all.

The app is the real one (``create_app``) over the pipeline on fakes (tests/api/test_api.py's
``Harness``), seeded with deployments so generated ids sometimes name a real one: a finished
deployment with a build log, a failed one, and a paused canary (abort and promote reach a live
deployment). Examples are bounded and derandomized, so CI sees the same cases on every run.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, cast

import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.config._checks import NegativeDataRejectionConfig
from schemathesis.generation.case import Case
from schemathesis.hooks import HookContext
from schemathesis.python import asgi
from schemathesis.schemas import BaseSchema

from shipyard.api.app import create_app
from shipyard.api.permissions import PERMISSIONS
from shipyard.domain.models import CONDITION_FORMAT, JSONPATH_FORMAT, URL_TEMPLATE_FORMAT
from shipyard.security import app_secrets
from tests.api.test_api import Harness, body, canary_body

#: Per operation and generation phase; 15 operations, twice (with and without a token).
MAX_EXAMPLES = 30


class Fuzzed:
    """The app under fuzzing, its harness, and the ids worth aiming at."""

    def __init__(self, tmp: Path) -> None:
        self.h = Harness(tmp)
        self.h.builder.fail.add("bad0")
        self.app: FastAPI = create_app(self.h.settings, context_factory=self.h.context)
        self.token = self.h.issue(*sorted(PERMISSIONS), subject="fuzzer").token
        #: A token the fuzzer may revoke (DELETE /tokens/{id}) without locking itself out.
        self.victim = self.h.issue("deployment:read", subject="victim").claims.token_id
        self.deployments: list[str] = []

    def seed(self) -> None:
        """Deployments through the API itself: a success, a failed build, a paused canary."""
        auth = {"authorization": f"Bearer {self.token}"}
        with asgi.get_client(cast(Any, self.app)) as client:
            for doc, wait, expected in (
                (body("aaaa"), True, 200),
                (body("bad0"), True, 500),  # deployment_failed: the build failed
                (body("bbbb", service="web"), True, 200),
                (_service(canary_body("cccc"), "web"), False, 202),
            ):
                url = "http://testserver/api/v1/deploy" + ("?wait=true" if wait else "")
                r = client.post(url, json=doc, headers=auth)
                assert r.status_code == expected, r.text
                self.deployments.append(r.json()["deployment_id"])

    def aim(self, case: Case[Any]) -> st.SearchStrategy[Case[Any]]:
        """The case, or (when it is meant to be valid) the same aimed at a real deployment,
        service or token instead of a random one."""
        params = case.path_parameters
        if not params or case.meta is None or case.meta.generation.mode.is_negative:
            return st.just(case)
        choices: list[dict[str, Any]] = [params]
        if "deployment_id" in params:
            choices += [{**params, "deployment_id": d} for d in self.deployments]
        if "name" in params:
            choices += [{**params, "name": n} for n in ("api", "web")]
        if "token_id" in params:
            choices.append({**params, "token_id": self.victim})
        return st.sampled_from(choices).map(lambda p: _with_path(case, p))


def _with_path(case: Case[Any], params: dict[str, Any]) -> Case[Any]:
    case.path_parameters = params
    return case


def _distinct_metrics(body: object) -> None:
    """What JSON Schema cannot say of a stage's ``analysis.metrics`` (names unique, at most one
    ``router`` metric), made true of a case meant to be valid: later duplicates renamed, extra
    router metrics left out. The validator's refusals of both are tested in
    tests/domain/test_analysis_metrics_manifest.py."""
    strategy = body.get("strategy") if isinstance(body, dict) else None
    canary = strategy.get("Canary") if isinstance(strategy, dict) else None
    stages = canary.get("stages") if isinstance(canary, dict) else None
    for stage in stages if isinstance(stages, list) else []:
        analysis = stage.get("analysis") if isinstance(stage, dict) else None
        if not isinstance(analysis, dict) or not isinstance(analysis.get("metrics"), list):
            continue
        metrics = analysis["metrics"]
        kept: list[Any] = []
        names: set[str] = set()
        router = False
        for m in metrics:
            if isinstance(m, dict) and m.get("provider") == "router":
                if router:
                    continue
                router = True
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                name, n = m["name"], 0
                while name in names:
                    n += 1
                    name = f"{m['name'][:56]}-{n}"
                names.add(name)
                m = {**m, "name": name}
            kept.append(m)
        analysis["metrics"] = kept


def _service(doc: dict[str, Any], service: str) -> dict[str, Any]:
    return {**doc, "target": {**doc["target"], "service_name": service}}


# Fields whose language no JSON-schema pattern can say carry a ``format`` of their own
# (``domain.models``); generated values come from these, so "schema-valid" means valid.
schemathesis.openapi.format(
    CONDITION_FORMAT,
    st.sampled_from(["result < 0.05", "result[0] >= 0.2 or isNaN(result)", "not (result == 1)"]),
)
schemathesis.openapi.format(
    URL_TEMPLATE_FORMAT,
    st.sampled_from(["http://127.0.0.1:9090", "https://metrics.example/{{region}}/{{canary}}"]),
)
schemathesis.openapi.format(
    JSONPATH_FORMAT, st.sampled_from(["$.data.error_rate", "$['error-rate'][0]", "$..p99"])
)
schemathesis.openapi.format(
    app_secrets.VALUE_FORMAT,
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1),
)

# Built at import: ``schema.parametrize`` needs the schema when the tests are collected
# (``schemathesis.pytest.from_fixture`` does not run under pytest 9). The data directory goes
# away with the process: every pytest-xdist worker imports this module, whether or not it is
# given any of its tests.
_fuzzed = Fuzzed(Path(tempfile.mkdtemp(prefix="shipyard-fuzz-")))
weakref.finalize(_fuzzed, shutil.rmtree, _fuzzed.h.settings.data_dir, ignore_errors=True)


def _schema(*, token: bool) -> BaseSchema:
    """The served schema, configured for one of the two runs."""
    loaded = schemathesis.openapi.from_asgi("/openapi.json", _fuzzed.app)
    # With a token, the Authorization header is ours (not generated), so negative cases never
    # drop it and the ignored_auth check's probes know what to take away.
    loaded.config.generation.update(
        max_examples=MAX_EXAMPLES, deterministic=True, with_security_parameters=not token
    )
    # A body over the server's limit is refused before validation, with 413: a rejection too.
    loaded.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
        expected_statuses=[*NegativeDataRejectionConfig().expected_statuses, 413]
    )

    @loaded.hook
    def flatmap_case(context: HookContext, case: Case[Any]) -> st.SearchStrategy[Case[Any]]:
        return _fuzzed.aim(case)

    @loaded.hook
    def map_case(context: HookContext, case: Case[Any]) -> Case[Any]:
        if case.meta is not None and not case.meta.generation.mode.is_negative:
            _distinct_metrics(case.body)
        return case

    return loaded


with_token = _schema(token=True)
without_token = _schema(token=False)


@pytest.fixture(scope="module", autouse=True)
def _seeded() -> Fuzzed:
    # Seeded once per process: a pytest-xdist worker may be given this module's tests in
    # several stretches, and a module fixture is set up again for each.
    if not _fuzzed.deployments:
        _fuzzed.seed()
    return _fuzzed


_settings = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


@with_token.parametrize()
@_settings
def test_with_a_token_holding_every_permission(case: Case[Any]) -> None:
    # Spelt as the schema's security scheme names it, so the ignored_auth check's probes can
    # take it away and see 401.
    case.call_and_validate(headers={"Authorization": f"Bearer {_fuzzed.token}"})


@without_token.parametrize()
@_settings
def test_without_a_token(case: Case[Any]) -> None:
    if case.headers is not None:
        case.headers.pop("Authorization", None)  # a CaseInsensitiveDict: any spelling
    case.call_and_validate()
