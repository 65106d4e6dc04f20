"""Structured logs: the JSON line's shape, and that secrets never reach the stream."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.build.running import BuildLog, run_command
from shipyard.errors import InvalidInput
from shipyard.logs import REDACTED, SecretMasker, configure_logging, log_event, redact
from shipyard.sandbox import Sandbox, SandboxPolicy

# A real HS256 token's shape (header {"alg":"HS256","typ":"JWT"}) and an alg-none one.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsInBlcm1pc3Npb25zIjpbXX0"
    ".c2lnbmF0dXJlLWJ5dGVzLWdvLWhlcmU"
)
UNSIGNED_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0."


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """configure_logging on the root logger, undone afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buf = io.StringIO()
    configure_logging("DEBUG", stream=buf)
    yield buf
    for handler in root.handlers:
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_level)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_base_fields(stream: io.StringIO) -> None:
    logger = logging.getLogger("shipyard.test")
    logger.info("deployment %s started", "d-1", extra={"deployment_id": "d-1", "attempt": 2})
    logger.warning("second line")

    first, second = lines(stream)
    assert set(first) == {"timestamp", "level", "logger", "event", "deployment_id", "attempt"}
    assert (first["level"], first["logger"], first["event"]) == (
        "INFO",
        "shipyard.test",
        "deployment d-1 started",
    )
    assert (first["deployment_id"], first["attempt"]) == ("d-1", 2)
    ts = dt.datetime.fromisoformat(first["timestamp"])
    assert ts.utcoffset() == dt.timedelta(0)
    assert "." in first["timestamp"]  # microseconds
    assert (second["level"], second["event"]) == ("WARNING", "second line")


def test_log_event_puts_fields_beside_the_event(stream: io.StringIO) -> None:
    log_event(
        logging.getLogger("shipyard.orchestrator"),
        "deployment.stage_completed",
        deployment_id="d-1",
        service="web",
        region="eu-west",
        user="alice",
        status="InProgress",
        duration_ms=1234,
        name="clashes with LogRecord.name",
    )
    logging.getLogger("shipyard.test").info("plain", extra={"event": "x", "logger": "y"})

    line, plain = lines(stream)
    assert (plain["event"], plain["field_event"], plain["field_logger"]) == ("plain", "x", "y")
    assert line["event"] == "deployment.stage_completed"
    assert line["logger"] == "shipyard.orchestrator"
    assert line["level"] == "INFO"
    assert line["name"] == "clashes with LogRecord.name"
    assert {k: line[k] for k in ("deployment_id", "service", "region", "user", "status")} == {
        "deployment_id": "d-1",
        "service": "web",
        "region": "eu-west",
        "user": "alice",
        "status": "InProgress",
    }
    assert line["duration_ms"] == 1234


def test_log_event_level_and_the_configured_threshold(stream: io.StringIO) -> None:
    logger = logging.getLogger("shipyard.test")
    configure_logging("WARNING", stream=stream)  # replaces the fixture's handler, same stream
    log_event(logger, "quiet")
    log_event(logger, "loud", level=logging.ERROR)

    assert [line["event"] for line in lines(stream)] == ["loud"]


#: Keys whose values are secrets, as callers and HTTP libraries spell them.
SECRET_KEYS = [
    "token",
    "api_token",
    "access_token",
    "X-Auth-Token",
    "Authorization",
    "Proxy-Authorization",
    "password",
    "db_password",
    "passwd",
    "passphrase",
    "client_secret",
    "aws_secret_access_key",
    "credentials",
    "signing_key",
    "private_key",
    "private_key_pem",
    "api_key",
    "apiKey",
    "X-Api-Key",
    "access_key",
    "session_key",
    "session_id",
    "sessionid",
    "cookie",
    "Set-Cookie",
    "session_cookie",
]

#: Keys that contain a secret-sounding word but hold ids, cache keys or names: they stay readable.
READABLE_KEYS = [
    "keyid",  # a signing key's public id (shown by `shipyard security`, in provenance)
    "keyId",
    "signing_keyid",
    "inputs_key",  # build cache keys
    "dependencies_key",
    "sticky_key",
    "sticky_header",  # the *name* of the header the router hashes
    "sticky_cookie",  # the *name* of the cookie the router hashes, not a cookie value
    "cookie_name",
    "token_type",  # metadata about a secret, not the secret
    "password_file",
    "secret_name",
    "key",  # a bare "key" names nothing secret
    "monkey",
]


@pytest.mark.parametrize("key", SECRET_KEYS, ids=SECRET_KEYS)
def test_values_under_secret_looking_keys_are_redacted(stream: io.StringIO, key: str) -> None:
    fields: dict[str, Any] = {
        "service": "web",
        "payload": {key: "hunter2", "nested": [{key: "hunter2", "ok": "visible"}]},
        key.replace("-", "_"): "hunter2",
    }
    log_event(logging.getLogger("shipyard.test"), "event", **fields)

    (line,) = lines(stream)
    assert "hunter2" not in json.dumps(line)
    assert line[key.replace("-", "_")] == REDACTED
    assert line["payload"] == {key: REDACTED, "nested": [{key: REDACTED, "ok": "visible"}]}
    assert line["service"] == "web"


@pytest.mark.parametrize("key", READABLE_KEYS, ids=READABLE_KEYS)
def test_values_under_keys_that_name_no_secret_stay_readable(stream: io.StringIO, key: str) -> None:
    value = "sha256:4f2a9c"
    fields: dict[str, Any] = {
        "payload": {key: value, "nested": [{key: value}]},
        key.replace("-", "_"): value,
    }
    log_event(logging.getLogger("shipyard.test"), "event", **fields)
    logging.getLogger("shipyard.test").info("plain", extra={key.replace("-", "_"): value})

    line, plain = lines(stream)
    assert line[key.replace("-", "_")] == value
    assert line["payload"] == {key: value, "nested": [{key: value}]}
    assert plain[key.replace("-", "_")] == value


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"sticky": {"header": "x-user", "cookie": "session"}},
            {"sticky": {"header": "x-user", "cookie": "session"}},
            id="sticky-cookie-name-nested",
        ),
        pytest.param(
            {"request": {"cookie": "session=abc123"}},
            {"request": {"cookie": REDACTED}},
            id="cookie-header-value-nested",
        ),
        pytest.param(
            {"api": {"key": "abc123", "url": "https://api"}},
            {"api": {"key": REDACTED, "url": "https://api"}},
            id="api-key-nested",
        ),
        pytest.param(
            {"cache": {"key": "abc123"}},
            {"cache": {"key": "abc123"}},
            id="cache-key-nested",
        ),
    ],
)
def test_the_enclosing_key_decides_for_a_bare_one(
    fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert redact(fields) == expected


def test_secret_keys_in_plain_extra_are_redacted(stream: io.StringIO) -> None:
    logging.getLogger("shipyard.test").info("login", extra={"password": "hunter2", "user": "bob"})

    (line,) = lines(stream)
    assert (line["password"], line["user"]) == (REDACTED, "bob")


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        pytest.param(f"header was Authorization: Bearer {JWT} ok", "ok", id="bearer-jwt"),
        pytest.param("got bearer abc123.def_456-xyz from client", "from client", id="bearer"),
        pytest.param(f"token {JWT} rejected", "rejected", id="bare-jwt"),
        pytest.param(f"alg none token {UNSIGNED_JWT} rejected", "rejected", id="alg-none-jwt"),
        pytest.param("connect password=hunter2 host=db", "host=db", id="password-pair"),
        pytest.param('config {"secret": "hunter2"} loaded', "loaded", id="quoted-pair"),
    ],
)
def test_tokens_inside_messages_are_masked(stream: io.StringIO, message: str, kept: str) -> None:
    logging.getLogger("shipyard.test").warning(message)

    (line,) = lines(stream)
    for secret in ("hunter2", "abc123", JWT, UNSIGNED_JWT, "c2lnbmF0dXJl"):
        assert secret not in line["event"]
    assert REDACTED in line["event"]
    assert kept in line["event"]


def test_tokens_passed_as_format_args_and_field_values_are_masked(stream: io.StringIO) -> None:
    logger = logging.getLogger("shipyard.test")
    logger.info("verifying %s", JWT)
    log_event(logger, "request", header=f"Bearer {JWT}")

    first, second = lines(stream)
    assert JWT not in json.dumps([first, second])
    assert first["event"] == f"verifying {REDACTED}"
    assert second["header"] == f"Bearer {REDACTED}"


def test_tracebacks_are_masked(stream: io.StringIO) -> None:
    logger = logging.getLogger("shipyard.test")
    try:
        raise ValueError(f"could not decode {JWT}")
    except ValueError:
        logger.exception("decode failed")

    (line,) = lines(stream)
    assert "ValueError: could not decode" in line["exception"]
    assert JWT not in line["exception"]


def test_text_mode_redacts_too() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buf = io.StringIO()
    try:
        configure_logging("INFO", json=False, stream=buf)
        logging.getLogger("shipyard.test").info("Authorization: Bearer %s", JWT)
    finally:
        for handler in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(handler)
        root.setLevel(saved_level)

    out = buf.getvalue()
    assert "shipyard.test" in out
    assert JWT not in out
    assert f"Bearer {REDACTED}" in out


def test_configuring_twice_keeps_one_handler(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    logging.getLogger("shipyard.test").info("once")

    assert [line["event"] for line in lines(stream)] == ["once"]


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown log level"):
        configure_logging("LOUD")


def test_redact_returns_a_copy() -> None:
    original = {"token": "t", "inner": {"password": "p"}, "items": [f"Bearer {JWT}"]}

    cleaned = redact(original)

    assert cleaned == {
        "token": REDACTED,
        "inner": {"password": REDACTED},
        "items": [f"Bearer {REDACTED}"],
    }
    assert original["token"] == "t"


# --- SecretMasker: workload output ---------------------------------------------------------------


def test_the_masker_hides_every_form_a_secret_can_be_printed_in(tmp_path: Path) -> None:
    raw = bytes(range(200, 232))  # a binary key, like keys/jwt.key
    token = b"agent-token-abcdefghijklmnop"
    masker = SecretMasker([raw, token])
    printed = [
        raw.decode("utf-8", errors="replace"),  # `cat keys/jwt.key`
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        f"Authorization: {token.decode()} and more",
    ]
    for line in printed:
        masked = masker(line)
        assert REDACTED in masked, line
        assert token.decode() not in masked and raw.hex() not in masked
    assert masker("nothing secret here") == "nothing secret here"


def test_the_masker_hides_each_line_of_a_pem_key() -> None:
    pem = (
        b"-----BEGIN PRIVATE KEY-----\n"
        b"MC4CAQAwBQYDK2VwBCIEIJ7k3N1zOq0jF9vXcQp1Y5xg2P0b8eFh2s9RtLmA0aBc\n"
        b"-----END PRIVATE KEY-----\n"
    )
    masker = SecretMasker([pem])
    assert masker("MC4CAQAwBQYDK2VwBCIEIJ7k3N1zOq0jF9vXcQp1Y5xg2P0b8eFh2s9RtLmA0aBc") == REDACTED
    # The armour is not secret; nobody needs it hidden.
    assert masker("-----BEGIN PRIVATE KEY-----") == "-----BEGIN PRIVATE KEY-----"


def test_the_masker_reads_the_data_directory_and_sees_new_tokens(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwt.key").write_bytes(b"k" * 32)
    masker = SecretMasker.from_data_dir(tmp_path)
    masker._refresh_s = 0  # re-read on every line for this test
    assert masker("k" * 32) == REDACTED
    agent = tmp_path / "agents" / "local"
    agent.mkdir(parents=True)
    (agent / "agent.token").write_text("a-token-made-after-the-masker")
    assert masker("token=a-token-made-after-the-masker") == f"token={REDACTED}"


async def test_a_build_that_prints_the_servers_keys_stores_none_of_them(tmp_path: Path) -> None:
    """Even unsandboxed (--insecure-no-sandbox), a build that cats the keys logs only masks."""
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    key = os.urandom(32)
    (data / "keys" / "jwt.key").write_bytes(key)
    key_file = data / "keys" / "jwt.key"
    hexdump = 'import sys; print(open(sys.argv[1], "rb").read().hex())'
    log_path = data / "logs" / "b.log"
    lines: list[str] = []
    with BuildLog(log_path, lines.append, mask=SecretMasker.from_data_dir(data)) as log:
        code = await run_command(
            ["sh", "-c", f"cat {key_file}; echo; python3 -c '{hexdump}' {key_file}"],
            cwd=tmp_path,
            sandbox=Sandbox(SandboxPolicy(data, insecure=True)),
            service="web",
            writable=[tmp_path],
            env={"PATH": os.environ["PATH"]},
            limit_s=30,
            log=log,
            what="build command",
        )
    assert code == 0
    stored = log_path.read_text()
    assert key.hex() not in stored and key.hex() not in "\n".join(lines)
    assert stored.count(REDACTED) >= 1
    assert oct(log_path.stat().st_mode & 0o777) == "0o640"
