"""The docker builder's ``registry`` setting (``shipyard serve --registry``): which values are
registries an image reference can start with, and how the server's flag reaches the builder.
No engine needed; the push itself is tests/build/test_docker_push.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.build.docker import DockerBuilder, DockerBuilderConfig, check_registry
from shipyard.build.registry import BuildConfig, builder_for
from shipyard.cli.main import app as cli
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import SourceConfig
from shipyard.errors import BuildFailed, InvalidInput
from shipyard.settings import Settings

from .helpers import manifest

SOURCE = SourceConfig(repository="/srv/app", branch="main", commit="abcd")

ACCEPTED = [
    "127.0.0.1:5000",
    "localhost",
    "localhost:5000",
    "registry.example.com",
    "registry.example.com:443/team/apps",
    "europe-docker.pkg.dev/my-project/apps",
    "[::1]:5000",
]

REFUSED = [
    pytest.param("http://127.0.0.1:5000", "no scheme", id="scheme"),
    pytest.param("https://registry.example.com", "no scheme", id="https-scheme"),
    pytest.param("myregistry", "Docker Hub namespace", id="bare-name-is-a-hub-namespace"),
    pytest.param("myregistry/apps", "Docker Hub namespace", id="bare-name-with-path"),
    pytest.param("127.0.0.1:99999", "not in 1-65535", id="port-out-of-range"),
    pytest.param("127.0.0.1:0", "not in 1-65535", id="port-zero"),
    pytest.param("registry.example.com/Team", "not host", id="upper-case-path"),
    pytest.param("registry.example.com/", "not host", id="trailing-slash"),
    pytest.param("registry.example.com/a//b", "not host", id="empty-path-component"),
    pytest.param("reg istry.example.com", "not host", id="space"),
    pytest.param("registry.example.com:5000:6000", "not host", id="two-ports"),
    pytest.param("registry.example.com/app:tag", "not host", id="a-tag-is-not-a-registry"),
    pytest.param("-bad.example.com", "not host", id="label-starts-with-dash"),
]


@pytest.mark.parametrize("value", ACCEPTED)
def test_accepted_registries(value: str) -> None:
    assert check_registry(value) == value
    assert DockerBuilderConfig(registry=value).registry == value


@pytest.mark.parametrize(("value", "reason"), REFUSED)
def test_refused_registries_say_why(value: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        check_registry(value)
    with pytest.raises(ValueError, match=reason):  # pydantic's ValidationError, naming the field
        DockerBuilderConfig(registry=value)


def test_the_registry_is_not_an_input_of_the_image(tmp_path: Path) -> None:
    """Turning --registry on must not rebuild: the input key ignores it (a cache hit is pushed)."""
    plain = DockerBuilder(tmp_path, DockerBuilderConfig())
    pushing = DockerBuilder(tmp_path, DockerBuilderConfig(registry="127.0.0.1:5000"))
    other_prefix = DockerBuilder(tmp_path, DockerBuilderConfig(repository_prefix="team"))
    assert plain._inputs_key("tree", None) == pushing._inputs_key("tree", None)
    assert plain._inputs_key("tree", None) != other_prefix._inputs_key("tree", None)


def test_the_server_setting_reaches_the_docker_builder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_registry="127.0.0.1:5000")
    config = BuildConfig(data_dir=tmp_path, builders=settings.builder_settings)
    built = builder_for(parse_manifest(manifest('builder = "docker"')), SOURCE, config)
    assert isinstance(built, DockerBuilder)
    assert built.config.registry == "127.0.0.1:5000"
    assert Settings(data_dir=tmp_path).builder_settings == {}


def test_a_bad_registry_in_the_server_settings_fails_the_build_saying_where(
    tmp_path: Path,
) -> None:
    config = BuildConfig(data_dir=tmp_path, builders={"docker": {"registry": "http://x:5000"}})
    with pytest.raises(BuildFailed, match=r"registry: .*no scheme"):
        builder_for(parse_manifest(manifest('builder = "docker"')), SOURCE, config)


def test_serve_refuses_a_bad_registry_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
        env={"SHIPYARD_REGISTRY": "http://127.0.0.1:5000"},
    )
    assert result.exit_code == 2, result.output
    assert "no scheme" in result.output
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_serve_help_shows_the_flag_with_its_brackets() -> None:
    # The help is Rich markup: an unescaped "[/path]" would be a closing tag and crash --help.
    result = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--registry" in result.output and "host[:port][/path]" in result.output
