"""``shipyard agent --http-listen/--https-listen ADDR:PORT`` parsing (``cli.listen``)."""

from __future__ import annotations

import pytest
import typer

from shipyard.cli.listen import parse_listen


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::]:443", ("::", 443)),
        ("localhost:80", ("localhost", 80)),
        (None, None),
        ("off", None),
    ],
)
def test_accepted(value: str | None, expected: tuple[str, int] | None) -> None:
    assert parse_listen("--https-listen", value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("443", "expects ADDR:PORT"),
        (":443", "expects ADDR:PORT"),
        ("0.0.0.0:0", "expects ADDR:PORT"),
        ("0.0.0.0:65536", "expects ADDR:PORT"),
        ("0.0.0.0:https", "expects ADDR:PORT"),
        ("::1:443", "in brackets"),
        ("[nope]:443", "not an IPv6 address"),
    ],
)
def test_refused_naming_the_option(value: str, message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message) as caught:
        parse_listen("--https-listen", value)
    assert "--https-listen" in str(caught.value)
