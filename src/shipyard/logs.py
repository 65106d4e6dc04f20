"""Structured logging: one JSON object per line, with secrets redacted before anything is written.

``configure_logging`` is called once at each edge (``shipyard serve``, ``shipyard agent``, the
CLI); the core logs through ``log_event`` (one event per deployment action, fields as in ADR
section 10) or plain ``logging`` calls with ``extra=``. The audit log emits one line per record.

A line looks like::

    {"timestamp": "2024-05-01T12:00:00.123456+00:00", "level": "INFO", "logger": "shipyard.audit",
     "event": "audit_record", "deployment_id": "...", ...}

Redaction (``RedactionFilter``, installed on the handler so it applies in text mode too): values
under keys that name a secret become ``"[redacted]"`` at any depth, and bearer tokens, JWT-shaped
strings and ``password=...``-style pairs inside messages and string values are masked. A key names
a secret when one of its words (split at ``_``, ``-``, ``.`` and camelCase) is a secret word
(token, password, passwd, passphrase, secret, authorization, credential(s), cookie(s)), or when
"key" follows a word that makes it one (api, private, signing, access, secret, session, ...).
Everything else stays readable, because a log that hides ids is a log nobody can debug with:
``keyid`` (a public key's id), ``inputs_key`` / ``dependencies_key`` (cache keys),
``sticky_key``, ``sticky_header`` and ``sticky_cookie`` (the *name* of the cookie the router
hashes, also as ``{"sticky": {"cookie": ...}}``) and metadata about a secret such as
``token_type``, ``password_file`` or ``secret_name``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json as jsonlib
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from shipyard.errors import InvalidInput

REDACTED = "[redacted]"

#: Words that make a key name a secret wherever they appear in it.
_SECRET_WORDS = frozenset(
    {
        "token",
        "tokens",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "cookies",
        "apikey",
        "privatekey",
        "sessionid",
    }
)
#: "key" after one of these is a secret (``api_key``, ``signing_key``, ``X-Api-Key``); after
#: anything else it is an id or a cache key (``inputs_key``, ``sticky_key``) and stays readable.
_SECRET_KEY_QUALIFIERS = frozenset(
    {"api", "private", "signing", "access", "secret", "session", "encryption", "master", "hmac"}
)
#: A last word that makes the key *about* a secret rather than the secret itself.
_METADATA_WORDS = frozenset(
    {"name", "names", "type", "path", "file", "dir", "id", "ids", "header", "count", "ttl"}
)
#: Words that make a following cookie word a cookie *name*: the router's sticky cookie.
_NAMING_QUALIFIERS = frozenset({"sticky"})
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
_BEARER = re.compile(r"\b(bearer)\s+[A-Za-z0-9._~+/=-]+", re.I)
# base64url('{"') is "eyJ": every JWT header starts with it; the signature may be empty (alg none).
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SECRET_PAIR = re.compile(
    r"\b(password|passwd|secret|token|api[_-]?key|cookie)([\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)",
    re.I,
)

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)
#: Where ``log_event`` puts its fields, so field names never clash with LogRecord attributes.
_FIELDS_ATTR = "shipyard_fields"
_BASE_KEYS = ("level", "logger", "event")


def redact_text(text: str) -> str:
    """Mask bearer tokens, JWT-shaped strings and ``secret=value`` pairs inside free text."""
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(key)]


def names_secret(key: str, *, within: str | None = None) -> bool:
    """Whether the value under ``key`` is a secret. ``within`` is the key of the mapping that
    holds it: ``{"sticky": {"cookie": "session"}}`` names a cookie, ``{"api": {"key": ...}}``
    is one."""
    words = _words(key)
    if words[-2:] == ["session", "id"]:  # a session id is a bearer credential, not metadata
        return True
    if not words or words[-1] in _METADATA_WORDS:
        return False
    context = _words(within)[-1:] if within else []
    before = [*context, *words]
    for i, word in enumerate(before[len(context) :], start=len(context)):
        previous = before[i - 1] if i else None
        if word in ("key", "keys") and previous in _SECRET_KEY_QUALIFIERS:
            return True
        if word in _SECRET_WORDS:
            if word.startswith("cookie") and previous in _NAMING_QUALIFIERS:
                continue
            return True
    return False


def redact(value: Any, *, within: str | None = None) -> Any:
    """A copy of ``value`` with the values of secret-naming keys blanked and strings masked, at
    any depth. ``within``: the key ``value`` sits under, if any (see :func:`names_secret`)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if names_secret(str(k), within=within) else redact(v, within=str(k))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v, within=within) for v in value]
    return value


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and k != _FIELDS_ATTR
    }
    fields.update(getattr(record, _FIELDS_ATTR, None) or {})
    return fields


class RedactionFilter(logging.Filter):
    """Rewrites each record in place: message, ``extra`` fields and traceback text redacted.

    Installed on the handler (not a logger), so every record that handler writes is covered.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format must not lose the line, nor leak its args
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        for key in list(record.__dict__):
            if key in _RECORD_ATTRS or key == _FIELDS_ATTR:
                continue
            value = record.__dict__[key]
            record.__dict__[key] = REDACTED if names_secret(key) else redact(value, within=key)
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            setattr(record, _FIELDS_ATTR, redact(fields))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (ISO-8601 UTC), level, logger, event, then the fields.

    A field named ``timestamp`` (an audit record's own time) replaces the log time; fields named
    like the other base keys are kept under ``field_<name>`` rather than silently lost.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            out[f"field_{key}" if key in _BASE_KEYS else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return jsonlib.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class _ShipyardHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so calling it again replaces it."""


def configure_logging(
    level: str = "INFO", json: bool = True, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record (root logger) to ``stream`` (default: ``sys.stderr`` at call time),
    redacted, as JSON lines or as plain text. Idempotent: replaces its own earlier handler and
    leaves others (pytest's, uvicorn's) alone. Returns the handler it installed."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise InvalidInput(
            f"unknown log level {level!r}; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ShipyardHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _ShipyardHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(numeric)
    # Client libraries log every request at INFO (the agent calls, the health probes): noise
    # next to the one-event-per-action log, so they speak only when something is wrong.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
    return handler


def log_event(
    logger: logging.Logger, event: str, /, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one structured event (``event`` becomes the line's ``event``; ``fields`` sit beside it).

    Field names are free (``name``, ``module``, ``timestamp`` are fine): they travel in one
    attribute rather than as LogRecord attributes.
    """
    logger.log(level, event, extra={_FIELDS_ATTR: fields})


# --- workload output ---------------------------------------------------------------------------

#: Secrets shorter than this are not searched for (they would mask ordinary words).
_MIN_SECRET = 8


def secret_forms(secret: bytes) -> set[str]:
    """The ways ``secret`` can appear in text a workload prints: the text itself and each of its
    lines (a PEM key's base64 lines, without its ``-----BEGIN`` armour), and for any secret its
    hex and base64 (standard and URL-safe, with and without padding) encodings and the runs of
    its bytes decoded as a log line decodes them (UTF-8 with replacement)."""
    forms: set[str] = set()
    text = secret.decode("utf-8", errors="replace")
    for line in [text.strip(), *text.replace("\r", "\n").split("\n")]:
        line = line.strip()
        if len(line) >= _MIN_SECRET and not line.startswith("-----"):
            forms.add(line)
    raw = secret.strip() if secret.isascii() else secret
    for encoded in (
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ):
        forms.add(encoded)
        forms.add(encoded.rstrip("="))
    return {f for f in forms if len(f) >= _MIN_SECRET}


class SecretMasker:
    """Replaces every known secret in a line of workload output with ``[redacted]``: build logs
    (``build.running.BuildLog``, the deployment's build log) and replica logs (the agent). The
    sandbox keeps secrets out of workloads' reach; this is the second fence, for what a
    misconfigured server or an unsandboxed one (``--insecure-no-sandbox``) would let through.

    ``from_data_dir`` knows the files that hold secrets (``keys/*.key``, ``fleet/*.key``, every
    agent's ``agent.token``, in the data and the shared directory) and re-reads them at most
    every ``refresh_s`` seconds, so a token created after the masker (an agent started later)
    is masked too."""

    def __init__(
        self,
        secrets: Iterable[bytes] = (),
        *,
        sources: Callable[[], Iterable[bytes]] | None = None,
        refresh_s: float = 5.0,
    ) -> None:
        self._fixed = list(secrets)
        self._sources = sources
        self._refresh_s = refresh_s
        self._loaded_at = -math.inf
        self._pattern: re.Pattern[str] | None = None
        self._reload()

    @classmethod
    def from_data_dir(
        cls, data_dir: Path, *extra: bytes, shared_dir: Path | None = None
    ) -> SecretMasker:
        """The masker of ``data_dir``'s secrets and those of ``shared_dir`` (keys and CA keys
        of ``serve --shared-dir``), plus ``extra``."""
        roots = list(dict.fromkeys([data_dir, shared_dir or data_dir]))

        def read() -> list[bytes]:
            found: list[bytes] = []
            for root in roots:
                for pattern in ("keys/*.key", "fleet/*.key", "agents/*/agent.token"):
                    for path in sorted(root.glob(pattern)):
                        with contextlib.suppress(OSError):
                            found.append(path.read_bytes())
            return found

        return cls(extra, sources=read)

    def _reload(self) -> None:
        secrets = list(self._fixed)
        if self._sources is not None:
            secrets += self._sources()
        forms = set().union(*(secret_forms(s) for s in secrets)) if secrets else set()
        # Longest first: a line of a PEM must not stop a longer form from matching whole.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._loaded_at = time.monotonic()

    def __call__(self, text: str) -> str:
        if self._sources is not None and time.monotonic() - self._loaded_at > self._refresh_s:
            self._reload()
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)
