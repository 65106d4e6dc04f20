"""Argo-style ``{{name}}`` placeholders in analysis queries and URLs (double braces, since
PromQL uses single ones): ``{{service}}``, ``{{canary}}``, ``{{stable}}``, ``{{region}}`` and
``{{window}}`` (the metric's interval as a PromQL duration, ``10s``).

``unknown`` is what manifest validation (``domain.models.MetricSettings``) calls: an unknown
name is a manifest error. ``render`` is what the analysis providers (``analysis.providers``)
call, each with its own escaping (a PromQL string literal, a URL component), so a substituted
value can never change the query's shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

PLACEHOLDERS = ("service", "canary", "stable", "region", "window")
_PATTERN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def names(text: str) -> set[str]:
    """Every placeholder name ``text`` uses."""
    return {m.group(1) for m in _PATTERN.finditer(text)}


def unknown(text: str) -> list[str]:
    """Placeholders in ``text`` that are not one of ``PLACEHOLDERS`` (sorted)."""
    return sorted(names(text) - set(PLACEHOLDERS))


def render(text: str, values: Mapping[str, str | None], escape: Callable[[str], str]) -> str:
    """``text`` with each placeholder replaced by ``escape(value)``; ``KeyError`` names a
    placeholder with no value here (``{{stable}}`` when nothing serves yet)."""

    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value is None:
            raise KeyError(m.group(1))
        return escape(value)

    return _PATTERN.sub(one, text)


def promql_string(value: str) -> str:
    """``value`` safe inside a double-quoted PromQL string literal (Go's escapes)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def promql_duration(seconds: float) -> str:
    """A PromQL duration for ``seconds``: ``10s``, or ``1500ms`` when not whole seconds."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, math.ceil(seconds * 1000))}ms"
