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
        ('[service]\nname = "x"\n[run]\ncommand = "x"\nshell = "maybe"\n', "run.shell"),
    ],
)
def test_invalid_manifests_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(text)
    assert needle in exc.value.message


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
