"""What a sink is, as the API accepts it and as the server config file declares it.

``SinkSpec`` (a ``webhook`` or a ``slack`` sink, told apart by ``type``) is the body of
``POST /api/v1/notifications/sinks`` (``api/notifications.py``) and one ``[[notifications.sinks]]``
table of ``shipyard serve --config FILE`` (``load_server_config``, called by ``cli/daemons.py``)::

    [[notifications.sinks]]
    name = "deploys"
    type = "webhook"
    url = "https://hooks.example.com/shipyard"
    secret_env = "DEPLOY_HOOK_SECRET"   # or secret = "..." (the HMAC key)
    events = ["deployment.failed", "deployment.rolled_back", "deployment.frozen"]

    [[notifications.sinks]]
    name = "team"
    type = "slack"
    url_env = "SLACK_WEBHOOK_URL"       # or url = "https://hooks.slack.com/services/..."

A file's ``secret_env`` / ``url_env`` name an environment variable of ``serve`` holding the value,
so the file itself can be committed. Values are ``SecretStr``: never in a ``repr`` or a log.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from shipyard.domain.models import DNS_LABEL
from shipyard.errors import InvalidInput
from shipyard.notify.events import EVENTS, check_events

DEFAULT_MAX_ATTEMPTS = 12
MIN_SECRET_LENGTH = 16


def _check_url(url: str) -> str:
    if not url.startswith(("https://", "http://")) or len(url) > 2048:
        raise ValueError("must be an http:// or https:// URL of at most 2048 characters")
    return url


class _Sink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="The sink's name.")
    events: list[str] = Field(
        default_factory=list,
        description="The events it receives (empty: all): " + ", ".join(EVENTS),
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100, description="Attempts before giving up."
    )

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        unknown = check_events(value)
        if unknown:
            raise ValueError(f"unknown event(s) {unknown}; valid: {', '.join(EVENTS)}")
        return sorted(set(value))


class WebhookSink(_Sink):
    """A generic webhook: signed POSTs of the JSON body (``notify/signing.py``)."""

    type: Literal["webhook"]
    url: str = Field(description="Where to POST.")
    secret: SecretStr = Field(
        description=f"The HMAC-SHA256 key ({MIN_SECRET_LENGTH}+ characters); stored sealed."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
        return value


class SlackSink(_Sink):
    """A Slack incoming webhook: ``{"text": ...}`` one line per event."""

    type: Literal["slack"]
    url: SecretStr = Field(description="The incoming webhook URL (a credential: stored sealed).")

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        _check_url(value.get_secret_value())
        return value


SinkSpec = Annotated[WebhookSink | SlackSink, Field(discriminator="type")]


class _Holder(BaseModel):
    sink: SinkSpec


def parse_sink(data: Any, where: str) -> WebhookSink | SlackSink:
    """``data`` as a sink; InvalidInput naming ``where`` and what is wrong (never a value)."""
    try:
        return _Holder.model_validate({"sink": data}).sink
    except ValidationError as exc:
        problems = "; ".join(
            f"{_field(e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        raise InvalidInput(f"{where}: {problems}") from None


def _field(loc: tuple[int | str, ...]) -> str:
    """An error's field without the holder and the union's tag: ``secret``, not
    ``sink.webhook.secret``."""
    parts = [str(p) for p in loc[1:]]
    if len(parts) > 1 and parts[0] in ("webhook", "slack"):
        parts = parts[1:]
    return ".".join(parts) or "sink"


class ServerConfig(BaseModel):
    """``shipyard serve --config FILE``: only notifications so far."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sinks: tuple[WebhookSink | SlackSink, ...] = ()
    #: The longest wait between two attempts at one notification (``[notifications]
    #: retry_cap_seconds``): the backoff doubles from 1 s up to it.
    retry_cap_seconds: float = Field(default=300.0, ge=1.0, le=3600.0)


def load_server_config(path: Path, environ: dict[str, str] | None = None) -> ServerConfig:
    """The server config file at ``path``; InvalidInput saying which entry and field is wrong
    (a missing ``*_env`` variable included). ``environ``: the environment (default
    ``os.environ``)."""
    env = dict(os.environ) if environ is None else environ
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"cannot read server config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"server config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"notifications"})
    if unknown:
        raise InvalidInput(
            f"server config {path}: unknown section(s) {unknown}; known: notifications"
        )
    section = doc.get("notifications", {})
    if not isinstance(section, dict) or set(section) - {"sinks", "retry_cap_seconds"}:
        raise InvalidInput(
            f"server config {path}: [notifications] holds retry_cap_seconds and "
            "[[notifications.sinks]] only"
        )
    entries = section.get("sinks", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"server config {path}: use [[notifications.sinks]] tables")
    sinks: list[WebhookSink | SlackSink] = []
    for i, entry in enumerate(entries):
        where = f"server config {path}, notifications.sinks[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: must be a table")
        resolved = dict(entry)
        for field, env_key in (("secret", "secret_env"), ("url", "url_env")):
            if env_key not in resolved:
                continue
            if field in resolved:
                raise InvalidInput(f"{where}: give {field} or {env_key}, not both")
            name = resolved.pop(env_key)
            if not isinstance(name, str) or name not in env:
                raise InvalidInput(
                    f"{where}: {env_key} names {name!r}, which is not set in serve's environment"
                )
            resolved[field] = env[name]
        sinks.append(parse_sink(resolved, where))
    names = [s.name for s in sinks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(f"server config {path}: sink name(s) {dupes} used twice")
    try:
        return ServerConfig(
            sinks=tuple(sinks), retry_cap_seconds=section.get("retry_cap_seconds", 300.0)
        )
    except ValidationError as exc:
        problems = "; ".join(e["msg"] for e in exc.errors(include_input=False))
        raise InvalidInput(f"server config {path}: retry_cap_seconds: {problems}") from None
