"""``shipyard serve --config FILE``: the server config's sinks, variables for credentials, and
errors that say which entry is wrong (and never show a value)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli.main import app
from shipyard.errors import InvalidInput
from shipyard.notify.config import SlackSink, WebhookSink, load_server_config

GOOD = """
[[notifications.sinks]]
name = "deploys"
type = "webhook"
url = "https://hooks.example.test/shipyard"
secret_env = "HOOK_SECRET"
events = ["deployment.failed", "deployment.frozen"]

[[notifications.sinks]]
name = "team"
type = "slack"
url_env = "SLACK_URL"
max_attempts = 3
"""
ENV = {"HOOK_SECRET": "s3cret-from-the-environment", "SLACK_URL": "https://hooks.slack.test/x"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_a_config_file_with_both_kinds_of_sink(tmp_path: Path) -> None:
    config = load_server_config(write(tmp_path, GOOD), ENV)
    hook, team = config.sinks
    assert isinstance(hook, WebhookSink) and isinstance(team, SlackSink)
    assert hook.secret.get_secret_value() == ENV["HOOK_SECRET"]
    assert hook.events == ["deployment.failed", "deployment.frozen"]
    assert team.url.get_secret_value() == ENV["SLACK_URL"] and team.max_attempts == 3
    assert ENV["HOOK_SECRET"] not in repr(config) and ENV["SLACK_URL"] not in repr(config)


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        pytest.param(GOOD, {}, "secret_env names 'HOOK_SECRET', which is not set", id="no-var"),
        pytest.param(
            GOOD.replace('secret_env = "HOOK_SECRET"', 'secret = "tiny"'),
            ENV,
            "notifications.sinks[0]: secret: Value error, must be at least 16 characters",
            id="short-secret",
        ),
        pytest.param(
            GOOD.replace('"team"', '"deploys"'),
            ENV,
            "sink name(s) ['deploys'] used twice",
            id="dup",
        ),
        pytest.param("[server]\nx = 1\n", ENV, "unknown section(s) ['server']", id="section"),
        pytest.param("[[notifications.sinks]\n", ENV, "is not valid TOML", id="toml"),
        pytest.param(
            GOOD.replace('url_env = "SLACK_URL"', 'url_env = "SLACK_URL"\nurl = "https://a/b"'),
            ENV,
            "give url or url_env, not both",
            id="both",
        ),
    ],
)
def test_a_bad_config_says_which_entry_and_why(
    tmp_path: Path, text: str, env: dict[str, str], says: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_server_config(write(tmp_path, text), env)
    assert says in caught.value.message
    assert "tiny" not in caught.value.message


def test_serve_refuses_a_bad_config_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    bad = write(tmp_path, GOOD)
    data_dir = tmp_path / "d"
    done = CliRunner().invoke(
        app,
        ["serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--config", str(bad)],
    )
    assert done.exit_code == 2, done.output
    assert "HOOK_SECRET" in done.output
    assert not (data_dir / "shipyard.db").exists()
