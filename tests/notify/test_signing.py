"""Signed webhooks: the signature of a known vector, and ``verify`` (and the receiver snippet in
notify/signing.py's docstring, run as written) accepting only what was signed, recently."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from shipyard.notify import signing

SECRET = b"whsec_0123456789abcdef"
BODY = b'{"event":"deployment.failed"}'
TS = 1_700_000_000
#: ``printf '%s' '1700000000.{"event":"deployment.failed"}' | openssl dgst -sha256 -hmac
#: 'whsec_0123456789abcdef'``
VECTOR = "20512dc2c2684034b88475f0104b2c29ba0c305c524643b34df5e4f3d55bb4a2"


def test_the_signature_of_a_known_vector() -> None:
    assert signing.sign(SECRET, TS, BODY) == {
        "X-Shipyard-Timestamp": "1700000000",
        "X-Shipyard-Signature": f"v1={VECTOR}",
    }


@pytest.mark.parametrize(
    ("secret", "body", "now", "ok"),
    [
        pytest.param(SECRET, BODY, TS + 10, True, id="signed-and-recent"),
        pytest.param(SECRET, BODY, TS - 299, True, id="receiver-clock-a-bit-behind"),
        pytest.param(SECRET, BODY + b" ", TS, False, id="body-changed"),
        pytest.param(b"another-secret-0000", BODY, TS, False, id="wrong-secret"),
        pytest.param(SECRET, BODY, TS + 301, False, id="replayed-after-tolerance"),
    ],
)
def test_verify(secret: bytes, body: bytes, now: float, ok: bool) -> None:
    headers = signing.sign(SECRET, TS, BODY)
    assert signing.verify(secret, headers, body, tolerance=300, now=now) is ok


def test_verify_takes_lowercase_headers_and_any_of_several_signatures() -> None:
    headers = {k.lower(): v for k, v in signing.sign(SECRET, TS, BODY).items()}
    headers["x-shipyard-signature"] = "v1=" + "0" * 64 + ", " + headers["x-shipyard-signature"]
    assert signing.verify(SECRET, headers, BODY, now=TS)
    headers["x-shipyard-signature"] = "v0=" + VECTOR  # not a v1 signature
    assert not signing.verify(SECRET, headers, BODY, now=TS)


def test_verify_refuses_a_missing_or_forged_timestamp() -> None:
    headers = signing.sign(SECRET, TS, BODY)
    assert not signing.verify(SECRET, {**headers, "X-Shipyard-Timestamp": ""}, BODY, now=TS)
    # The timestamp is signed: moving it forward to pass the tolerance breaks the signature.
    moved = {**headers, "X-Shipyard-Timestamp": str(TS + 1000)}
    assert not signing.verify(SECRET, moved, BODY, now=TS + 1000)


def test_the_receiver_snippet_in_the_docstring_works_as_written() -> None:
    doc = signing.__doc__ or ""
    snippet = re.search(r"::\n\n(.*?)\n\"?$", doc, re.S)
    assert snippet is not None
    code = "\n".join(line[4:] for line in snippet.group(1).splitlines())
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - our own docstring, the copy a receiver makes
    now = int(time.time())
    headers = signing.sign(SECRET, now, BODY)
    assert scope["verify"](SECRET, headers, BODY) is True
    assert scope["verify"](SECRET, headers, BODY + b"x") is False
    stale = signing.sign(SECRET, now - 600, BODY)
    assert scope["verify"](SECRET, stale, BODY) is False
