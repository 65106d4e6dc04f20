"""Credentials in repository URLs: which URLs carry one, the redacted form, and the refusal's
advice. Table-driven; every refused case checks that no part of the secret survives."""

from __future__ import annotations

import pytest

from shipyard.domain import repository_urls

SECRET = "ghp_S3cr3tT0ken"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            f"https://alice:{SECRET}@git.example.invalid/org/repo.git",
            "https://***@git.example.invalid/org/repo.git",
            id="https-user-token",
        ),
        pytest.param(
            f"https://{SECRET}@git.example.invalid/org/repo.git",
            "https://***@git.example.invalid/org/repo.git",
            id="https-token-as-user",
        ),
        pytest.param(
            f"https://x-access-token:{SECRET}@git.example.invalid:8443/org/repo",
            "https://***@git.example.invalid:8443/org/repo",
            id="https-with-port",
        ),
        pytest.param(
            f"HTTP://bob:{SECRET}@git.example.invalid/r",
            "HTTP://***@git.example.invalid/r",
            id="upper-case-scheme",
        ),
        pytest.param(
            f"ssh://deploy:{SECRET}@git.example.invalid/org/repo.git",
            "ssh://***@git.example.invalid/org/repo.git",
            id="ssh-password",
        ),
        pytest.param(
            f"deploy:{SECRET}@git.example.invalid:org/repo.git",
            "***@git.example.invalid:org/repo.git",
            id="scp-like-password",
        ),
        pytest.param(
            f"https://bob:{SECRET}/x@git.example.invalid/org/repo",
            "https://***@git.example.invalid/org/repo",
            id="unencoded-slash-in-password",
        ),
        pytest.param(
            f"https://bob:{SECRET}@odd@git.example.invalid/r",
            "https://***@git.example.invalid/r",
            id="unencoded-at-in-password",
        ),
        pytest.param(
            f"git://{SECRET}@git.example.invalid/r",
            "git://***@git.example.invalid/r",
            id="git-protocol",
        ),
    ],
)
def test_credentials_are_found_and_redacted(url: str, shown: str) -> None:
    assert repository_urls.has_credentials(url)
    assert repository_urls.redacted(url) == shown
    message = repository_urls.credentials_refusal(url)
    assert message is not None
    assert shown in message
    for fragment in (SECRET, SECRET[:6], SECRET[-6:]):
        assert fragment not in message
    assert "credential helper" in message and "GIT_ASKPASS" in message and "~/.ssh" in message


@pytest.mark.parametrize(
    "url",
    [
        "https://git.example.invalid/org/repo.git",
        "https://git.example.invalid:8443/org/repo@v1",  # '@' in the path, ':' is the port
        "https://git.example.invalid/org/repo?ref=a@b",
        "ssh://git@git.example.invalid/org/repo.git",  # a login name, the key authenticates
        "git@git.example.invalid:org/repo.git",
        "file:///srv/git/repo.git",
        "/srv/git/odd:name@here",  # a local path: characters only
        "./relative/repo",
        "~/repos/app",
    ],
)
def test_urls_without_credentials_pass(url: str) -> None:
    assert not repository_urls.has_credentials(url)
    assert repository_urls.credentials_refusal(url) is None
    assert repository_urls.redacted(url) == url


def test_the_redacted_form_is_not_itself_a_credential() -> None:
    shown = repository_urls.redacted(f"https://ci:{SECRET}@git.example.invalid/r.git")
    assert not repository_urls.has_credentials(shown)
    assert repository_urls.redacted(shown) == shown
