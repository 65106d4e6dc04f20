"""Credentials in repository URLs: found, redacted, and refused with advice.

A repository URL is stored with the deployment, logged, shown by ``shipyard status`` and
written into signed provenance, so a token inside it (``https://user:TOKEN@host/repo.git``,
``https://TOKEN@host/...``, ``ssh://user:PASSWORD@host/...``) would leak everywhere. Shipyard
refuses such URLs at the edge and tells the operator to give the *server's* user git credentials
instead. Callers: ``domain.models.SourceConfig`` (every API request and ``shipyard build``),
the CLI's ``deploy`` before it runs ``git ls-remote``, and ``build.source.normalize_repository``
(defence in depth for anything else that names a repository).

What counts as a credential:

* http(s), git and file URLs: any userinfo at all. A lone name in an https URL is how tokens are
  passed (``https://TOKEN@github.com/...``), and we cannot tell a name from a token.
* ssh URLs and scp-like ``user@host:path``: a password (``user:secret@``). A user name alone
  (``ssh://git@host/...``, ``git@host:org/repo``) is the login; the key does the authenticating.
* A ``user:secret@`` before the host even when the secret holds an unencoded ``/`` (which RFC 3986
  would read as the start of the path): it is still a secret someone typed into a URL.

The redacted form replaces the whole userinfo with ``***``: no prefix, suffix or length of the
secret survives.
"""

from __future__ import annotations

import re

#: Schemes where a user name alone is a login, not a secret.
_SSH_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git"})
#: ``scheme://`` then the authority up to the first ``/?#``.
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
#: ``user:secret@`` right after ``scheme://``, where the secret may hold ``/`` (but the user may
#: not): the shape of a mistyped credential that RFC 3986 parsing would miss.
_USER_PASSWORD = re.compile(r"^[^/@:?#]*:[^@]*@")
_AUTHORITY_END = re.compile(r"[/?#]")
_PORT_THEN_PATH = re.compile(r"\d{1,5}(?:[/?#]|$)")
#: scp-like ``user[:password]@host:path`` (no ``://``, no leading path character).
_SCP = re.compile(r"^(?P<userinfo>[^/@]+)@(?P<rest>[^/@]+:.*)$", re.DOTALL)

REDACTED = "***"
ADVICE = (
    "Do not put credentials in the URL (it is stored, logged and signed into provenance). "
    "Give the server's user access instead: a git credential helper "
    "(git config --global credential.helper store, then one clone by hand), GIT_ASKPASS in the "
    "server's environment, or an SSH deploy key in the server user's ~/.ssh with an "
    "ssh://git@host/org/repo.git URL. See README, 'Private repositories'."
)


def _split(repository: str) -> tuple[str, str, str] | None:
    """(prefix, userinfo, rest) when ``repository`` carries a credential, else None."""
    url = _URL.match(repository)
    if url is not None:
        scheme, rest = url["scheme"].lower(), url["rest"]
        prefix = repository[: url.start("rest")]
        loose = _USER_PASSWORD.match(rest)
        if loose is not None and not _PORT_THEN_PATH.match(rest, rest.index(":") + 1):
            # user:secret@, whatever the scheme (host:port/path@x is a path with an '@'); the
            # secret runs to the last '@' before the host's end, as RFC 3986 reads userinfo.
            host_end = _AUTHORITY_END.search(rest, loose.end())
            last_at = rest.rindex("@", 0, host_end.start() if host_end else len(rest))
            return prefix, rest[:last_at], rest[last_at + 1 :]
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        userinfo, at, _ = authority.rpartition("@")
        if not at:
            return None
        if scheme in _SSH_SCHEMES and ":" not in userinfo:
            return None  # ssh://git@host: a login name
        return prefix, userinfo, rest[len(userinfo) + 1 :]
    if repository.startswith(("/", ".", "~")):
        return None  # a local path; '@' and ':' are just characters in file names
    scp = _SCP.match(repository)
    if scp is not None and ":" in scp["userinfo"]:
        return "", scp["userinfo"], scp["rest"]
    return None


def has_credentials(repository: str) -> bool:
    """True when ``repository`` carries a credential. The redacted form's ``***`` is none: a
    record stored before the rule loads redacted, and that URL is readable again."""
    parts = _split(repository.strip())
    return parts is not None and parts[1] != REDACTED


def redacted(repository: str) -> str:
    """``repository`` with its userinfo replaced by ``***`` (unchanged when it has none)."""
    parts = _split(repository.strip())
    if parts is None:
        return repository
    prefix, _, rest = parts
    return f"{prefix}{REDACTED}@{rest}"


def credentials_refusal(repository: str) -> str | None:
    """The message refusing ``repository`` if it carries a credential, else None. The message
    names the URL only in its redacted form."""
    if not has_credentials(repository):
        return None
    return f"repository {redacted(repository)} has credentials in its URL. {ADVICE}"
