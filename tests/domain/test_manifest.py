"""shipyard.toml parsing: valid manifests load; invalid ones name the field and the reason."""

from __future__ import annotations

import json
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
        ('[service]\nname = "x"\n', "[run] command is required"),
        ('[service]\nname = "x"\n[run]\nreplicas = 2\n', "[run] command is required"),
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


IMAGE = '[service]\nname = "x"\n[build]\nbuilder = "docker"\n'


def test_an_image_needs_no_command_and_takes_container_settings() -> None:
    m = parse_manifest(
        IMAGE + '[run]\nport = 8000\nmemory = "1.5g"\ncpus = 0.25\nstop_timeout_seconds = 2.5\n'
    )
    assert m.builds_image
    assert m.run.argv == []  # the image's ENTRYPOINT/CMD
    assert (m.run.port, m.run.memory_bytes, m.run.nano_cpus) == (8000, 1536 * 2**20, 250_000_000)
    assert m.run.stop_timeout_seconds == 2.5
    assert parse_manifest(IMAGE).run.memory_bytes is None


@pytest.mark.parametrize(
    ("memory", "size"),
    [("256m", 256 * 2**20), ("1G", 2**30), ("6291456", 6 * 2**20), ("8192k", 8 * 2**20)],
)
def test_memory_sizes(memory: str, size: int) -> None:
    assert parse_manifest(IMAGE + f'[run]\nmemory = "{memory}"\n').run.memory_bytes == size


@pytest.mark.parametrize(
    ("run", "needles"),
    [
        ('memory = "lots"', ["run.memory", "not a size", '"256m"']),
        ('memory = "5m"', ["run.memory", "at least 6m"]),
        ('memory = "-1m"', ["run.memory", "not a size"]),
        ("cpus = 0.001", ["run.cpus", "below 0.01"]),
        ("cpus = 0", ["run.cpus", "greater than 0"]),
        ("port = 0", ["run.port", "greater than or equal to 1"]),
        ("port = 70000", ["run.port"]),
        ('port = "80"', ["run.port"]),
        ("stop_timeout_seconds = -1", ["run.stop_timeout_seconds"]),
        ("stop_timeout_seconds = 7200", ["run.stop_timeout_seconds"]),
    ],
)
def test_invalid_container_settings_name_the_field(run: str, needles: list[str]) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(IMAGE + f"[run]\n{run}\n")
    for needle in needles:
        assert needle in exc.value.message


def test_container_settings_are_refused_for_a_directory_artifact() -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest('[service]\nname = "x"\n[run]\ncommand = "x"\nport = 80\ncpus = 1\n')
    message = exc.value.message
    assert "[run] port, cpus apply to containers only" in message
    assert '[build] builder = "docker"' in message
    # stop_timeout_seconds applies to processes too
    assert parse_manifest('[service]\nname = "x"\n[run]\ncommand = "x"\nstop_timeout_seconds = 3\n')


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


# --- commands: a shell only when asked ------------------------------------------------------------


def _manifest(build: str = "", run: str = 'command = "python3 app.py"') -> str:
    return f'[service]\nname = "x"\n[build]\n{build}\n[run]\n{run}\n'


@pytest.mark.parametrize(
    ("build", "argv"),
    [
        pytest.param('command = "make dist"', ["make", "dist"], id="string-split"),
        pytest.param(
            'command = ["sh", "-c", "pip install -r r.txt && make"]',
            ["sh", "-c", "pip install -r r.txt && make"],
            id="argv-list",
        ),
        pytest.param(
            'shell = true\ncommand = "pip install -r r.txt && make > out.txt"',
            ["/bin/sh", "-c", "pip install -r r.txt && make > out.txt"],
            id="shell-true",
        ),
        pytest.param(
            "command = \"sh -c 'a && b | c; echo $HOME'\"",
            ["sh", "-c", "a && b | c; echo $HOME"],
            id="operators-inside-quotes-are-arguments",
        ),
        pytest.param(
            'command = "pip install flask>=2 https://x.invalid/?a=1&b=2"',
            ["pip", "install", "flask>=2", "https://x.invalid/?a=1&b=2"],
            id="operator-characters-inside-a-word",
        ),
        pytest.param(
            r'command = "echo a\\;b"',
            ["echo", "a;b"],
            id="escaped-operator",
        ),
    ],
)
def test_build_command_forms(build: str, argv: list[str]) -> None:
    m = parse_manifest(_manifest(build))
    assert m.build.argv == argv


@pytest.mark.parametrize(
    ("command", "syntax"),
    [
        pytest.param("pip install -r requirements.txt && make", "&&", id="and"),
        pytest.param("make || true", "||", id="or"),
        pytest.param("make; make install", ";", id="semicolon"),
        pytest.param("make | tee log", "|", id="pipe"),
        pytest.param("make > log", ">", id="redirect"),
        pytest.param("make >log", ">", id="redirect-attached"),
        pytest.param("make 2>&1", "2>&1", id="fd-redirect"),
        pytest.param("sleep 1 &", "&", id="background"),
        pytest.param("echo $(date)", "$(...)", id="command-substitution"),
        pytest.param('echo "$(date)"', "$(...)", id="substitution-in-double-quotes"),
        pytest.param("echo `date`", "`...`", id="backquotes"),
        pytest.param("gunicorn -b 127.0.0.1:$PORT app:app", "$PORT", id="variable"),
        pytest.param("echo ${HOME}", "${...}", id="braced-variable"),
    ],
)
def test_shell_syntax_in_a_plain_string_says_how_to_write_it(command: str, syntax: str) -> None:
    for section, text in (
        ("build", _manifest(f"command = {json.dumps(command)}")),
        ("run", _manifest(run=f"command = {json.dumps(command)}")),
    ):
        with pytest.raises(ManifestError) as exc:
            parse_manifest(text)
        message = exc.value.message
        assert f"{section}.command" in message
        assert f"shell syntax ({syntax})" in message
        assert f"add shell = true to [{section}]" in message
        assert f'command = ["sh", "-c", {json.dumps(command)}]' in message


def test_single_quotes_keep_dollar_literal() -> None:
    m = parse_manifest(_manifest(run="command = \"echo '$PORT'\""))
    assert m.run.argv == ["echo", "$PORT"]


def test_dependencies_follow_the_same_rules() -> None:
    with pytest.raises(ManifestError, match=r"build\.dependencies.*shell syntax \(&&\)"):
        parse_manifest(_manifest('dependencies = "python3 -m venv .venv && .venv/bin/pip x"'))
    m = parse_manifest(_manifest('shell = true\ndependencies = "python3 -m venv v && v/bin/pip x"'))
    assert m.build.dependencies_argv == ["/bin/sh", "-c", "python3 -m venv v && v/bin/pip x"]


def test_run_shell_and_list_forms() -> None:
    m = parse_manifest(_manifest(run='shell = true\ncommand = "exec gunicorn -b 127.0.0.1:$PORT"'))
    assert m.run.argv == ["/bin/sh", "-c", "exec gunicorn -b 127.0.0.1:$PORT"]
    m = parse_manifest(_manifest(run='command = ["python3", "app.py", "--name", "two words"]'))
    assert m.run.argv == ["python3", "app.py", "--name", "two words"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param(
            _manifest('shell = true\ncommand = ["make", "dist"]'),
            "shell = true needs the command as one string",
            id="shell-with-a-list",
        ),
        pytest.param(_manifest("command = []"), "build.command", id="empty-list"),
        pytest.param(
            _manifest('command = ["", "x"]'),
            "first element (the program) is empty",
            id="no-program",
        ),
        pytest.param(
            _manifest(run='command = "x"\nenv = { "BAD-NAME" = "1" }'), "run.env", id="env-name"
        ),
    ],
)
def test_refused_command_forms(text: str, needle: str) -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(text)
    assert needle in exc.value.message


def test_command_text_is_one_line_for_provenance() -> None:
    listed = parse_manifest(_manifest('command = ["sh", "-c", "make && make install"]'))
    assert listed.build.command_text == "sh -c 'make && make install'"
    shell = parse_manifest(_manifest('shell = true\ncommand = "make && make install"'))
    assert shell.build.command_text == "make && make install"
