"""Host rules and the shared listener's host table (``routing.hosts``, ``domain.hostnames``):
what a rule may be, how a request's host is read from its head, which service wins."""

from __future__ import annotations

import re

import pytest

from shipyard.domain.hostnames import HostRule, parse_host_rule
from shipyard.routing.hosts import HostTable, normalise_host, request_host


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        pytest.param("notes.example.com", HostRule("notes.example.com"), id="name"),
        pytest.param("Notes.EXAMPLE.com.", HostRule("notes.example.com"), id="case-and-dot"),
        pytest.param("*.example.com", HostRule("*.example.com"), id="wildcard"),
        pytest.param("example.com/api", HostRule("example.com", "/api"), id="prefix"),
        pytest.param("example.com/api/", HostRule("example.com", "/api"), id="prefix-slash"),
        pytest.param("example.com/", HostRule("example.com"), id="root-prefix-is-none"),
        pytest.param("localhost", HostRule("localhost"), id="one-label"),
        pytest.param("a-b.x1.example", HostRule("a-b.x1.example"), id="hyphen-digits"),
    ],
)
def test_valid_rules_are_normalised(text: str, rule: HostRule) -> None:
    assert parse_host_rule(text) == rule


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "not a DNS name", id="empty"),
        pytest.param("exa_mple.com", "not a DNS name", id="underscore"),
        pytest.param("-a.example.com", "not a DNS name", id="leading-hyphen"),
        pytest.param("a..example.com", "not a DNS name", id="empty-label"),
        pytest.param("example.com:443", "has a port", id="port"),
        pytest.param("*.com", "two labels", id="wildcard-tld"),
        pytest.param("a.*.example.com", "not a DNS name", id="inner-wildcard"),
        pytest.param("*example.com", "not a DNS name", id="partial-wildcard"),
        pytest.param("x" * 64 + ".com", "not a DNS name", id="long-label"),
        pytest.param(".".join(["abcdefgh"] * 29), "not a DNS name", id="long-name"),
        pytest.param("example.com/a/../b", "path prefix", id="dot-dot"),
        pytest.param("example.com/a//b", "path prefix", id="empty-segment"),
        pytest.param("example.com/a?b", "path prefix", id="query"),
        pytest.param("exämple.com", "not a DNS name", id="non-ascii"),
    ],
)
def test_invalid_rules_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_host_rule(text)


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        (b"Example.COM", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"example.com.:80", b"example.com"),
        (b"[::1]:443", b"[::1]"),
        (b"", b""),
    ],
)
def test_request_hosts_are_normalised(raw: bytes, host: bytes) -> None:
    assert normalise_host(raw) == host


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        pytest.param(
            b"GET /a/b?x=1 HTTP/1.1\r\nHost: Notes.Example.com:80\r\n\r\n",
            (b"notes.example.com", b"/a/b"),
            id="host-field",
        ),
        pytest.param(
            b"GET /x HTTP/1.1\r\nx-host: evil.test\r\nhost: \t good.test \r\n\r\n",
            (b"good.test", b"/x"),
            id="only-the-host-field",
        ),
        pytest.param(
            b"GET http://Other.test:81/p?q HTTP/1.1\r\nhost: notes.test\r\n\r\n",
            (b"other.test", b"/p"),
            id="absolute-form-wins",
        ),
        pytest.param(
            b"GET http://other.test HTTP/1.1\r\nhost: notes.test\r\n\r\n",
            (b"other.test", b"/"),
            id="absolute-form-no-path",
        ),
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", (b"", b"/"), id="http10-no-host"),
    ],
)
def test_request_host_reads_what_http1_accepted(head: bytes, expected: tuple[bytes, bytes]) -> None:
    assert request_host(head) == expected


def _table() -> HostTable[str]:
    claims = {
        "site": [parse_host_rule("example.com")],
        "api": [parse_host_rule("example.com/api")],
        "v2": [parse_host_rule("example.com/api/v2")],
        "wild": [parse_host_rule("*.example.com")],
        "admin": [parse_host_rule("admin.example.com/console")],
    }
    return HostTable(claims, {s: s for s in claims})


@pytest.mark.parametrize(
    ("host", "path", "service"),
    [
        pytest.param(b"example.com", b"/", "site", id="root"),
        pytest.param(b"example.com", b"/apix", "site", id="prefix-is-whole-segments"),
        pytest.param(b"example.com", b"/api", "api", id="prefix-exact"),
        pytest.param(b"example.com", b"/api/users", "api", id="prefix-below"),
        pytest.param(b"example.com", b"/api/v2/users", "v2", id="longest-prefix-wins"),
        pytest.param(b"example.com", b"/API", "site", id="paths-are-case-sensitive"),
        pytest.param(b"a.example.com", b"/", "wild", id="wildcard"),
        pytest.param(b"a.b.example.com", b"/", None, id="wildcard-is-one-label"),
        pytest.param(b"admin.example.com", b"/console/x", "admin", id="exact-beats-wildcard"),
        pytest.param(b"admin.example.com", b"/other", "wild", id="falls-through-to-wildcard"),
        pytest.param(b"a'b.example.com", b"/", None, id="wildcard-label-must-be-dns"),
        pytest.param(b"example.org", b"/", None, id="unknown"),
        pytest.param(b"", b"/", None, id="no-host"),
    ],
)
def test_matching(host: bytes, path: bytes, service: str | None) -> None:
    assert _table().match(host, path) == service


def test_resolve_caches_per_head_and_agrees_with_match() -> None:
    table = _table()
    head = b"GET /api/v2/x HTTP/1.1\r\nhost: EXAMPLE.com:8080\r\n\r\n"
    first = table.resolve(head)
    assert first == ("v2", b"example.com")
    assert table.resolve(head) is first  # the second lookup is the cached answer


def test_two_services_claiming_one_host_is_refused_naming_both() -> None:
    claims = {
        "notes": [parse_host_rule("notes.example.com")],
        "blog": [parse_host_rule("blog.example.com"), parse_host_rule("Notes.example.com")],
    }
    refusal = re.escape("notes.example.com is already served by service 'notes'")
    with pytest.raises(ValueError, match=refusal):
        HostTable(claims, {s: s for s in claims})


def test_same_host_different_prefixes_is_allowed() -> None:
    claims = {
        "site": [parse_host_rule("example.com")],
        "api": [parse_host_rule("example.com/api")],
    }
    table = HostTable(claims, {s: s for s in claims})
    assert table.match(b"example.com", b"/api/x") == "api"
    assert table.match(b"example.com", b"/x") == "site"
