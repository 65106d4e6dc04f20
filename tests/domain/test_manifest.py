"""shipyard.toml parsing: valid manifests load; invalid ones name the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from shipyard.domain.manifest import load_manifest, parse_manifest
from shipyard.errors import ManifestError

GOOD = """
[service]
name = "hello"
[build]
command = "make"
[run]
command = "python3 app.py --flag 'two words'"
[health]
endpoint = "/health"
interval_seconds = 0.25
timeout_seconds = 1.5
success_threshold = 2
failure_threshold = 3
"""


def test_valid_manifest() -> None:
    m = parse_manifest(GOOD)
    assert m.service.name == "hello"
    assert m.run.argv == ["python3", "app.py", "--flag", "two words"]
    assert m.health.interval_seconds == 0.25
    assert m.health.timeout_seconds == 1.5
    assert m.build.command == "make"


def test_defaults() -> None:
    m = parse_manifest('[service]\nname = "x"\n[run]\ncommand = "./serve"\n')
    assert m.health.endpoint == "/health"
    assert m.run.replicas == 1
    assert m.build.command is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not toml [", "not valid TOML"),
        ('[service]\nname = "x"\n', "run: Field required"),
        ('[service]\nname = "Bad Name"\n[run]\ncommand = "x"\n', "service.name"),
        ('[service]\nname = "x"\n[run]\ncommand = ""\n', "run.command"),
        ('[service]\nname = "x"\n[run]\ncommand = "unbalanced \'quote"\n', "run.command"),
        (
            '[service]\nname = "x"\n[run]\ncommand = "x"\n[health]\ntimeout_seconds = 6\n',
            "health.timeout_seconds",
        ),
        (
            '[service]\nname = "x"\n[run]\ncommand = "x"\n[health]\nsuccess_threshold = 0\n',
            "health.success_threshold",
        ),
        (
            '[service]\nname = "x"\n[run]\ncommand = "x"\n[health]\nendpoint = "health"\n',
            "health.endpoint",
        ),
        ('[service]\nname = "x"\n[run]\ncommand = "x"\nshell = true\n', "run.shell"),
    ],
)
def test_invalid_manifests_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(text)
    assert needle in exc.value.message


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)


BASE = '[service]\nname = "hello"\n[run]\ncommand = "python3 app.py"\n[analysis]\n'


@pytest.mark.parametrize(
    ("load", "rps", "path"),
    [
        pytest.param('load = { rps = 20, path = "/" }', 20, "/", id="readme-example"),
        pytest.param("load = { rps = 0.5 }", 0.5, "/", id="path-defaults-to-root"),
        pytest.param('load = { rps = 1000, path = "/ping?from=load" }', 1000, "/ping?from=load",
                     id="at-the-ceiling-with-a-query"),
    ],
)  # fmt: skip
def test_analysis_load_is_accepted(load: str, rps: float, path: str) -> None:
    m = parse_manifest(BASE + load + "\n")
    assert m.analysis.load is not None
    assert (m.analysis.load.rps, m.analysis.load.path) == (rps, path)


@pytest.mark.parametrize(
    ("load", "needle"),
    [
        pytest.param("load = { rps = 1001 }", "analysis.load.rps", id="above-1000-rps"),
        pytest.param("load = { rps = 0 }", "analysis.load.rps", id="zero-rps"),
        pytest.param("load = { rps = -5 }", "analysis.load.rps", id="negative-rps"),
        pytest.param('load = { path = "/" }', "analysis.load.rps", id="rps-required"),
        pytest.param('load = { rps = 5, path = "http://evil.example/" }', "analysis.load.path",
                     id="absolute-url-refused"),
        pytest.param('load = { rps = 5, path = "ping" }', "analysis.load.path", id="relative"),
        pytest.param('load = { rps = 5, path = "/a b" }', "analysis.load.path", id="space"),
        pytest.param('load = { rps = 5, host = "evil.example" }', "analysis.load.host",
                     id="no-host-field"),
    ],
)  # fmt: skip
def test_analysis_load_bad_input_names_the_field(load: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=needle.replace(".", r"\.")):
        parse_manifest(BASE + load + "\n")
