"""The README's manifest reference is generated from the manifest's models (cli/manifest_docs.py)
and cannot drift: it must equal what the generator writes, every field must say what it means,
and a field added to a model shows up without touching the generator."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import Field

from shipyard.cli import manifest_docs
from shipyard.domain.manifest import Manifest, RunSection, ServiceSection, parse_manifest
from shipyard.domain.models import WireModel

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_what_the_models_say() -> None:
    text = README.read_text(encoding="utf-8")
    assert manifest_docs.START in text and manifest_docs.END in text
    assert manifest_docs.render_readme(text) == text, (
        "README.md's manifest reference differs from the manifest's models; regenerate it with "
        f"`{manifest_docs.REGENERATE}` (python -m shipyard.cli.manifest_docs) and commit README.md"
    )


def test_every_manifest_key_is_in_the_reference() -> None:
    block = README.read_text(encoding="utf-8").partition(manifest_docs.START)[2]
    block = block.partition(manifest_docs.END)[0]
    for name, field in Manifest.model_fields.items():
        assert f"#### `[{name}]`" in block
        # A table's model, or the model of an array of tables ([[gates]]).
        model = manifest_docs.SECTION_MODELS.get(name) or next(
            iter(manifest_docs._models_in(field.annotation))
        )
        for key in model.model_fields:
            assert f"| `{key}` |" in block, f"[{name}] {key} is missing from README.md"


def test_the_keys_the_issue_names_are_documented() -> None:
    rows = {(s.name, r.key): r for s in manifest_docs.sections() for r in s.rows}
    for key in [
        ("build", "command"),
        ("build", "shell"),
        ("build", "dependencies"),
        ("build", "cache_key_files"),
        ("build", "timeout_seconds"),
        ("build", "builder"),
        ("build", "dockerfile"),
        ("run", "env"),
        ("run", "replicas"),
        ("run", "port"),
        ("run", "memory"),
        ("run", "cpus"),
        ("run", "stop_timeout_seconds"),
        ("analysis", "insufficient_data"),
        ("analysis", "max_extensions"),
        ("routing", "sticky_header"),
        ("routing", "sticky_cookie"),
        ("security", "allow[].expires"),
    ]:
        assert rows[key].meaning, key
    assert rows[("build", "builder")].type == '"local" | "docker" | "cloudbuild"'
    assert rows[("build", "timeout_seconds")].default == "`600`"
    assert rows[("service", "name")].default == "required"
    # required for directory artifacts only: the model validator says so, the row says "none"
    assert rows[("run", "command")].default == "none"
    assert "Required for directory artifacts" in rows[("run", "command")].meaning
    assert rows[("run", "memory")].default == "none"
    assert rows[("run", "stop_timeout_seconds")].default == "`10`"
    # analysis keys are unset in the manifest model; the reference shows the built-in default
    assert rows[("analysis", "max_extensions")].default == "`6`"
    assert rows[("analysis", "insufficient_data")].default == '`"extend"`'


class _LoadSettings(WireModel):
    rps: float = Field(default=20.0, description="Requests per second.")
    path: str = Field(default="/", description="Path requested.")


class _ServiceWithPort(ServiceSection):
    port: int | None = Field(default=None, ge=1, le=65535, description="The listener's port.")


class _Grown(Manifest):
    """The manifest after other changes: a new key in a section and a new nested table."""

    service: _ServiceWithPort = Field(description="Who this is.")
    load: _LoadSettings | None = Field(default=None, description="Traffic during analysis.")


def test_a_new_field_appears_without_touching_the_generator() -> None:
    text = manifest_docs.reference(_Grown)
    assert "| `port` | integer, >= 1 and <= 65535 | none | The listener's port. |" in text
    assert "#### `[load]` (optional)" in text
    assert "| `rps` | number | `20` | Requests per second. |" in text


class _Undocumented(Manifest):
    run: RunSection = Field(description="How a replica starts.")
    extra: _LoadSettings = Field(default_factory=_LoadSettings)


class _UndocumentedKey(WireModel):
    documented: int = Field(default=1, description="Says what it is.")
    silent: int = 2


class _UndocumentedInSection(Manifest):
    quiet: _UndocumentedKey = Field(default_factory=_UndocumentedKey, description="A table.")


@pytest.mark.parametrize(
    ("model", "named"),
    [
        pytest.param(_Undocumented, "extra", id="a-section"),
        pytest.param(_UndocumentedInSection, "quiet.silent", id="a-key"),
    ],
)
def test_a_field_without_a_description_fails(model: type[Manifest], named: str) -> None:
    with pytest.raises(manifest_docs.UndocumentedField, match=re.escape(named)):
        manifest_docs.reference(model)


def test_check_mode_reports_a_stale_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    stale = f"intro\n{manifest_docs.START}\nold text\n{manifest_docs.END}\noutro\n"
    readme.write_text(stale)
    assert manifest_docs.main(["--check", "--readme", str(readme)]) == 1
    assert readme.read_text() == stale
    assert manifest_docs.main(["--readme", str(readme)]) == 0
    fresh = readme.read_text()
    assert fresh.startswith("intro\n") and fresh.endswith(f"{manifest_docs.END}\noutro\n")
    assert "old text" not in fresh and "#### `[build]` (optional)" in fresh
    assert manifest_docs.main(["--check", "--readme", str(readme)]) == 0


def test_readme_without_markers_is_an_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    assert manifest_docs.main(["--readme", str(readme)]) == 2


def test_every_manifest_example_in_the_readme_is_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    manifests = [b for b in blocks if "[service]" in b]
    assert len(manifests) >= 2
    for block in manifests:
        tomllib.loads(block)
        parse_manifest(block, origin="README.md example")
