"""Where ``[[analysis.metrics]]`` values come from: ``prometheus`` (an instant PromQL query
against the metric's ``address``) and ``web`` (GET a URL, a value from its JSON answer by a
JSONPath), keyed by the manifest's ``provider`` (``default_providers``). The ``router`` provider
is the built-in check of the router's counters, run by the Analyse executor itself (it needs the
deployment's router and windows of its snapshots).

A provider substitutes the placeholders with its own escaping (PromQL string literal, URL
component), asks, and answers a ``metrics.Reading``; whatever goes wrong (refused, timed out, not
JSON, an answer of the wrong shape) is a ``MetricProviderError``, which the executor records as
an Argo-style measurement *error* (``consecutive_error_limit`` applies). Answers are read up to
``MAX_ANSWER_BYTES``. Called by ``orchestrator/steps/analysis.py``; a test passes its own
providers through ``orchestrator.context.Deps.metric_providers``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import jsonpath

from shipyard.analysis.metrics import Reading
from shipyard.analysis.policy import MetricPolicy
from shipyard.domain import placeholders
from shipyard.domain.expressions import Value
from shipyard.errors import TransientError

#: An answer longer than this is refused (a metric is a number, not a download).
MAX_ANSWER_BYTES = 1 << 20
#: Foreign error text is cut to this length before it is recorded.
MAX_REASON = 300


class MetricProviderError(TransientError):
    """A metric provider could not give a value: unreachable, refused the query, timed out, or
    answered something that is not a value."""

    code = "metric_provider_error"


class MetricProvider(Protocol):
    async def read(self, metric: MetricPolicy, values: Mapping[str, str | None]) -> Reading:
        """The metric's value now, with ``values`` substituted for its placeholders."""
        ...


def _url_component(value: str) -> str:
    return quote(value, safe="")


def _render(text: str, values: Mapping[str, str | None], escape: Any) -> str:
    try:
        return placeholders.render(text, values, escape)
    except KeyError as exc:
        raise MetricProviderError(
            f"{{{{{exc.args[0]}}}}} has no value in this deployment (no stable revision)"
        ) from None


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


async def _get(
    url: str,
    *,
    params: Mapping[str, str] | None,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None,
    what: str,
) -> tuple[int, Any]:
    """GET ``url``: the status and the JSON answer (None when it was not JSON)."""
    try:
        async with (
            httpx.AsyncClient(timeout=timeout, transport=transport) as client,
            client.stream(
                "GET", url, params=params, headers={"accept": "application/json"}
            ) as answer,
        ):
            body = bytearray()
            async for chunk in answer.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise MetricProviderError(
                        f"{what} answered more than {MAX_ANSWER_BYTES} bytes: not a metric"
                    )
            status = answer.status_code
    except httpx.TimeoutException:
        raise MetricProviderError(f"{what} did not answer within {timeout:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MetricProviderError(_cut(f"{what} is unreachable: {exc}")) from None
    try:
        return status, json.loads(bytes(body))
    except ValueError:
        # The body is not echoed: whatever answered may not be what the metric meant to ask.
        if status != 200:
            raise MetricProviderError(f"{what} answered {status}, not JSON") from None
        return status, None


class PrometheusProvider:
    """``GET {address}/api/v1/query?query=...`` (an instant query, evaluated now).

    ``result`` is the number of a one-sample vector or a scalar; a list of numbers when the
    vector has several samples (``result[0]``, ``max(result)``); no data when it has none.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    async def read(self, metric: MetricPolicy, values: Mapping[str, str | None]) -> Reading:
        assert metric.address is not None and metric.query is not None
        address = _render(metric.address, values, _url_component).rstrip("/")
        query = _render(metric.query, values, placeholders.promql_string)
        what = f"prometheus at {address}"
        status, doc = await _get(
            f"{address}/api/v1/query",
            params={"query": query},
            timeout=metric.timeout_seconds,
            transport=self._transport,
            what=what,
        )
        if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
            raise MetricProviderError(f"{what} answered {status}, not a Prometheus API answer")
        if status != 200 or doc.get("status") != "success":
            # Prometheus's own error text (the query is the manifest's); nothing else echoed.
            raise MetricProviderError(
                _cut(
                    f"{what} refused the query ({status} {doc.get('errorType', '')}): "
                    f"{doc.get('error', 'no reason given')}"
                )
            )
        try:
            return Reading(_prometheus_value(doc["data"]), query)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise MetricProviderError(_cut(f"{what} answered an unexpected shape: {exc}")) from None


def _prometheus_value(data: Mapping[str, Any]) -> Value | None:
    kind, result = data["resultType"], data["result"]
    match kind:
        case "vector":
            samples = [float(s["value"][1]) for s in result]
            if not samples:
                return None
            return samples[0] if len(samples) == 1 else samples
        case "scalar":
            return float(result[1])
        case "string":
            return str(result[1])
    raise ValueError(
        f"a {kind} result: write an instant query (a range vector needs rate(), "
        "avg_over_time() or similar around it)"
    )


class WebProvider:
    """``GET url`` and the value at ``json_path`` in the JSON answer (python-jsonpath, RFC 9535).

    One match is ``result``; several make it a list; none (or JSON null) is no data. A match must
    be a number, a string, a boolean or a list of them.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport

    async def read(self, metric: MetricPolicy, values: Mapping[str, str | None]) -> Reading:
        assert metric.url is not None and metric.json_path is not None
        url = _render(metric.url, values, _url_component)
        what = f"GET {url}"
        status, doc = await _get(
            url, params=None, timeout=metric.timeout_seconds, transport=self._transport, what=what
        )
        if status != 200:
            raise MetricProviderError(_cut(f"{what} answered {status}"))
        if doc is None:
            raise MetricProviderError(f"{what} did not answer JSON")
        try:
            matches = jsonpath.findall(metric.json_path, doc)
        except jsonpath.JSONPathError as exc:
            raise MetricProviderError(_cut(f"json_path {metric.json_path}: {exc}")) from None
        found = [_web_value(m, metric.json_path) for m in matches]
        if not found or any(v is None for v in found):
            return Reading(None, url)
        if len(found) == 1:
            return Reading(found[0], url)
        return Reading([v for v in found if v is not None], url)


def _web_value(match: object, path: str) -> Value | None:
    if match is None or isinstance(match, bool | int | float | str):
        return match
    if isinstance(match, list) and all(isinstance(v, bool | int | float | str) for v in match):
        return list(match)
    kind = "an object" if isinstance(match, dict) else "a nested list"
    raise MetricProviderError(
        f"json_path {path} selects {kind}: select numbers, strings or booleans"
    )


def default_providers() -> dict[str, MetricProvider]:
    """The providers a control plane uses, keyed by the manifest's ``provider``."""
    return {"prometheus": PrometheusProvider(), "web": WebProvider()}
