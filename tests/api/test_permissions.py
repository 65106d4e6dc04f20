"""Permission strings: what parses (and what it covers), and every malformed one refused clearly."""

from __future__ import annotations

import pytest

from shipyard.api.permissions import PERMISSIONS, Permission, lenient, parse
from shipyard.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("deployment:create", Permission("deployment:create"), id="unscoped"),
        pytest.param("token:admin", Permission("token:admin"), id="admin"),
        pytest.param(
            "deployment:create:payments",
            Permission("deployment:create", "payments"),
            id="one-service",
        ),
        pytest.param(
            "deployment:read:web-*", Permission("deployment:read", "web-*"), id="prefix-glob"
        ),
        pytest.param(
            "deployment:rollback:*-eu", Permission("deployment:rollback", "*-eu"), id="suffix-glob"
        ),
        pytest.param("deployment:read:*", Permission("deployment:read", "*"), id="star"),
        pytest.param("deployment:read:a?c", Permission("deployment:read", "a?c"), id="question"),
    ],
)
def test_valid_permissions_parse(text: str, expected: Permission) -> None:
    assert parse(text) == expected
    assert str(parse(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("deployment:delete", "unknown permission 'deployment:delete'", id="unknown"),
        pytest.param("admin", "unknown permission 'admin'", id="not-a-base"),
        pytest.param("deployment:creates", "unknown permission", id="base-prefix-only"),
        pytest.param("deployment:create:", "empty service scope", id="empty-scope"),
        pytest.param("token:admin:web", "cannot be narrowed to services", id="admin-scoped"),
        pytest.param("deployment:create:Web-*", "is not a service name or a glob", id="upper"),
        pytest.param("deployment:create:web_api", "is not a service name", id="underscore"),
        pytest.param("deployment:create:-web", "is not a service name", id="leading-hyphen"),
        pytest.param("deployment:create:web-", "is not a service name", id="trailing-hyphen"),
        pytest.param("deployment:create:web-[ab]", "is not a service name", id="char-class"),
        pytest.param("deployment:create:a:b", "is not a service name", id="two-scopes"),
        pytest.param("deployment:create:" + "a" * 64, "is not a service name", id="too-long"),
        pytest.param("deployment:create:web api", "is not a service name", id="space"),
    ],
)
def test_malformed_permissions_are_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse(text)
    assert message in caught.value.message


def test_an_unknown_permission_error_lists_the_valid_ones_and_the_scope_syntax() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse("deploy")
    for permission in PERMISSIONS:
        assert permission in caught.value.message
    assert "deployment:create:web-*" in caught.value.message


@pytest.mark.parametrize(
    ("scope", "service", "covered"),
    [
        pytest.param(None, "anything", True, id="unscoped"),
        pytest.param("payments", "payments", True, id="exact"),
        pytest.param("payments", "payments2", False, id="exact-is-not-prefix"),
        pytest.param("web-*", "web-api", True, id="glob"),
        pytest.param("web-*", "web", False, id="glob-needs-the-hyphen"),
        pytest.param("web-*", "api-web-x", False, id="glob-is-anchored"),
        pytest.param("*-eu", "shop-eu", True, id="suffix"),
        pytest.param("a?c", "abc", True, id="question-one-char"),
        pytest.param("a?c", "abbc", False, id="question-only-one"),
    ],
)
def test_covers(scope: str | None, service: str, covered: bool) -> None:
    assert Permission("deployment:read", scope).covers(service) is covered


def test_strings_a_token_carries_that_do_not_parse_grant_nothing() -> None:
    assert lenient(["deployment:read:web-*", "root", 7, "token:admin:x"]) == {
        Permission("deployment:read", "web-*")
    }
