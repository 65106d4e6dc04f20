"""The manifest reference in README.md, generated from the manifest's own models.

Every key of ``shipyard.toml`` is a field of ``domain.manifest.Manifest``'s section models (and of
``security.policy.SecurityPolicy`` for ``[security]``, which the manifest keeps as a plain table
until the gate validates it); its meaning is the field's ``description``. ``reference`` renders
them as Markdown tables, one per section, so a key added to a model appears in the README by
running ``make docs`` (``python -m shipyard.cli.manifest_docs``), which rewrites the block between
``START`` and ``END`` in README.md; ``--check`` only compares. A field without a description is an
error (``UndocumentedField``): the reference is the manual, and an undocumented key is a bug.
``tests/cli/test_manifest_docs.py`` fails when README.md differs from what this writes.

Lives in ``cli`` because it reads models of several layers (domain, security, analysis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shipyard.analysis.policy import AnalysisPolicy
from shipyard.domain.manifest import Manifest
from shipyard.security.policy import SecurityPolicy

START = "<!-- manifest-reference:start -->"
END = "<!-- manifest-reference:end -->"
#: What the test failure and the block itself tell a contributor to run.
REGENERATE = "make docs"
README = Path(__file__).resolve().parents[3] / "README.md"

#: Sections the manifest keeps as an untyped table, documented from the model that checks them.
SECTION_MODELS: Mapping[str, type[BaseModel]] = {"security": SecurityPolicy}
#: Sections whose unset keys take built-in defaults from elsewhere (shown as the default).
BUILT_IN_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "analysis": dataclasses.asdict(AnalysisPolicy())
}


class UndocumentedField(Exception):
    """A manifest field has no ``description``: add ``Field(description=...)`` to it."""


@dataclass(frozen=True)
class Row:
    """One key of one section: what the README's table shows of it."""

    key: str
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class Section:
    """One ``[table]`` of the manifest."""

    name: str
    required: bool
    meaning: str
    rows: tuple[Row, ...]


def sections(manifest: type[BaseModel] = Manifest) -> list[Section]:
    """Every section of ``manifest`` with every key, in declaration order.

    ``UndocumentedField`` names each field (``section.key``) that lacks a description."""
    missing: list[str] = []
    out: list[Section] = []
    for name, field in manifest.model_fields.items():
        model = SECTION_MODELS.get(name) or next(iter(_models_in(field.annotation)), None)
        meaning = _describe(field, name, missing)
        if model is None:
            raise UndocumentedField(
                f"manifest field {name!r} is not a table model; give it one so its keys are "
                "documented"
            )
        rows = tuple(_rows(model, name, "", BUILT_IN_DEFAULTS.get(name, {}), missing))
        out.append(Section(name, field.is_required(), meaning, rows))
    if missing:
        raise UndocumentedField(
            "manifest fields without a description (add Field(description=...) in the model): "
            + ", ".join(missing)
        )
    return out


def reference(manifest: type[BaseModel] = Manifest) -> str:
    """The Markdown between the README's markers (without them)."""
    lines = [
        f"<!-- generated from the manifest's models by `{REGENERATE}` "
        "(python -m shipyard.cli.manifest_docs); do not edit by hand -->",
        "",
    ]
    for section in sections(manifest):
        state = "required" if section.required else "optional"
        lines += [f"#### `[{section.name}]` ({state})", "", section.meaning, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in section.rows:
            cells = (f"`{row.key}`", row.type, row.default, row.meaning)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_readme(text: str, manifest: type[BaseModel] = Manifest) -> str:
    """``text`` (README.md's content) with the block between the markers regenerated."""
    head, start, rest = text.partition(START)
    body, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md has no {START} ... {END} block to fill")
    del body
    return f"{head}{START}\n{reference(manifest)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """``python -m shipyard.cli.manifest_docs [--check] [--readme PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        wanted = render_readme(text)
    except (UndocumentedField, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if wanted == text:
        return 0
    if args.check:
        print(f"{args.readme}: the manifest reference is stale; run {REGENERATE}", file=sys.stderr)
        return 1
    args.readme.write_text(wanted, encoding="utf-8")
    print(f"{args.readme}: manifest reference updated")
    return 0


# --- rendering one model ---------------------------------------------------------------------


def _rows(
    model: type[BaseModel],
    section: str,
    prefix: str,
    built_in: Mapping[str, Any],
    missing: list[str],
) -> Iterator[Row]:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    for name, field in model.model_fields.items():
        key = field.alias or name
        meaning = _describe(field, f"{section}.{prefix}{key}", missing)
        prop = schema.get("properties", {}).get(key, {})
        nested = _models_in(field.annotation)
        if nested:
            many = _is_list(field.annotation)
            yield Row(prefix + key, _type(prop, defs), _default(field, built_in.get(name)), meaning)
            inner = f"{prefix}{key}{'[]' if many else ''}."
            seen: set[str] = set()
            for each in _documented(nested):
                for row in _rows(each, section, inner, {}, missing):
                    if row.key not in seen:
                        seen.add(row.key)
                        yield row
            continue
        yield Row(prefix + key, _type(prop, defs), _default(field, built_in.get(name)), meaning)


def _describe(field: FieldInfo, where: str, missing: list[str]) -> str:
    if not field.description or not field.description.strip():
        missing.append(where)
        return ""
    return " ".join(field.description.split())


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside ``annotation`` (``X``, ``X | None``, ``list[X]``, a union of
    models such as ``analysis.metrics``' one per provider), in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found


def _documented(models: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """What a table documents for a union of models: their nearest common base first (the keys
    they share, described once), then each member's own keys."""
    if len(models) == 1:
        return models
    for base in models[0].__mro__[1:]:
        shared = isinstance(base, type) and issubclass(base, BaseModel) and base.model_fields
        if shared and all(issubclass(m, base) for m in models):
            return [base, *models]
    return models


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _is_list(typing.get_args(annotation)[0])
    return False


def _type(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    """A JSON schema, said in a few words ("integer, 1 to 64", "list of strings")."""
    if "anyOf" in prop:
        kinds = [_type(p, defs) for p in prop["anyOf"] if p.get("type") != "null"]
        return " or ".join(dict.fromkeys(kinds))
    if "$ref" in prop:
        return "table"
    if "oneOf" in prop and all("$ref" in p for p in prop["oneOf"]):
        return "table"  # one model per tag (a discriminated union)
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    if kind == "array":
        item = _type(prop.get("items", {}), defs)
        return f"list of {_plural(item)}"
    if kind == "object":
        values = prop.get("additionalProperties") or next(
            iter(prop.get("patternProperties", {}).values()), None
        )
        if isinstance(values, dict) and values:
            return f"table of {_plural(_type(values, defs))}"
        return "table"
    if kind in ("integer", "number"):
        return f"{kind}{_bounds(prop)}"
    if kind == "string":
        return "date" if prop.get("format") == "date" else "string"
    if kind == "boolean":
        return "boolean"
    return "any"


def _bounds(prop: Mapping[str, Any]) -> str:
    low = (
        f">= {_num(prop['minimum'])}"
        if "minimum" in prop
        else f"> {_num(prop['exclusiveMinimum'])}"
        if "exclusiveMinimum" in prop
        else None
    )
    high = (
        f"<= {_num(prop['maximum'])}"
        if "maximum" in prop
        else f"< {_num(prop['exclusiveMaximum'])}"
        if "exclusiveMaximum" in prop
        else None
    )
    said = [b for b in (low, high) if b is not None]
    return f", {' and '.join(said)}" if said else ""


def _plural(kind: str) -> str:
    first, sep, rest = kind.partition(",")
    if first in ("string", "integer", "number", "boolean", "table", "date"):
        return first + "s" + sep + rest
    return f"({kind})"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _default(field: FieldInfo, built_in: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None and built_in is not None and built_in != ():
        return _toml(built_in)
    if value is None or isinstance(value, BaseModel):
        return "none"
    return _toml(value)


def _toml(value: Any) -> str:
    """A default as it would be written in TOML."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, (int, str, list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    # A '|' would end the cell, even inside `code` (GitHub renders the escaped one as '|').
    return text.replace("|", "\\|")


if __name__ == "__main__":
    raise SystemExit(main())
