"""Version ordering per ecosystem, for deciding whether an installed version is inside an
advisory's affected range (``osv.py``) and which fixed versions lie above it (``scanning.py``).

* PyPI: PEP 440 through ``packaging.version``. A version PEP 440 cannot parse has no place in the
  order: ``parse`` returns None and the caller falls back to exact string matches.
* Debian (and Ubuntu): the dpkg algorithm (``[epoch:]upstream[-revision]``, ``~`` sorts before
  everything, even the end of the string), ported from dpkg's ``verrevcmp``.
* Alpine: apk-tools' order (``parse_apk``: numbers, letter, ``_rc``/``_p``-style suffixes,
  ``-r`` revision).
* SEMVER: Semantic Versioning 2.0.0 precedence (build metadata ignored; a leading ``v``, as Go
  writes versions, is tolerated).

``ordering_for(ecosystem)`` picks one; ``parse`` turns a version string into a totally ordered
key or None when the string is not a version of that scheme.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from packaging.version import InvalidVersion, Version


class Comparable(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...
    def __le__(self, other: Any, /) -> bool: ...
    def __gt__(self, other: Any, /) -> bool: ...
    def __ge__(self, other: Any, /) -> bool: ...


Parser: TypeAlias = Callable[[str], Comparable | None]


# --- PEP 440 --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def parse_pypi(version: str) -> Version | None:
    """PEP 440 version, or None when ``version`` is not one (e.g. ``2004d``, ``latest``)."""
    try:
        return Version(version)
    except InvalidVersion:
        return None


# --- dpkg -----------------------------------------------------------------------------------------

_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_UPSTREAM_OK = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_REVISION_OK = re.compile(r"^[A-Za-z0-9.+~]*$")
_DIGIT_RUN = re.compile(r"[0-9]+")


def _order(c: str) -> int:
    # dpkg lib/dpkg/version.c order(): digits (and the end) weigh 0, letters their code, '~'
    # less than anything, other characters after all letters.
    if c in _DIGITS:
        return 0
    if c in _LETTERS:
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def verrevcmp(a: str, b: str) -> int:
    """dpkg's comparison of one upstream version or revision part: <0, 0, >0."""
    i = j = 0
    la, lb = len(a), len(b)
    while i < la or j < lb:
        first_diff = 0
        while (i < la and a[i] not in _DIGITS) or (j < lb and b[j] not in _DIGITS):
            ac = _order(a[i]) if i < la else 0
            bc = _order(b[j]) if j < lb else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < la and a[i] == "0":
            i += 1
        while j < lb and b[j] == "0":
            j += 1
        while i < la and a[i] in _DIGITS and j < lb and b[j] in _DIGITS:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < la and a[i] in _DIGITS:
            return 1
        if j < lb and b[j] in _DIGITS:
            return -1
        if first_diff:
            return first_diff
    return 0


@functools.total_ordering
class DebianVersion:
    """``[epoch:]upstream[-revision]``, ordered exactly as ``dpkg --compare-versions``."""

    __slots__ = ("epoch", "revision", "upstream")

    def __init__(self, text: str) -> None:
        text = text.strip()
        if not text:
            raise ValueError("empty version")
        if any(c.isspace() for c in text):
            raise ValueError(f"{text!r}: version contains whitespace")
        epoch_s, sep, rest = text.partition(":")
        if sep:
            if not epoch_s.isdigit():
                raise ValueError(f"{text!r}: epoch {epoch_s!r} is not a number")
            self.epoch = int(epoch_s)
        else:
            self.epoch, rest = 0, text
        upstream, sep, revision = rest.rpartition("-")
        if not sep:
            upstream, revision = rest, ""
        if not _UPSTREAM_OK.match(upstream):
            raise ValueError(f"{text!r}: upstream version {upstream!r} must start with a digit")
        if not _REVISION_OK.match(revision) or (sep and not revision):
            raise ValueError(f"{text!r}: invalid revision {revision!r}")
        self.upstream = upstream
        self.revision = revision

    def compare(self, other: DebianVersion) -> int:
        if self.epoch != other.epoch:
            return -1 if self.epoch < other.epoch else 1
        c = verrevcmp(self.upstream, other.upstream)
        if c:
            return c
        return verrevcmp(self.revision, other.revision)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DebianVersion) and self.compare(other) == 0

    def __lt__(self, other: DebianVersion) -> bool:
        return self.compare(other) < 0

    def __hash__(self) -> int:
        # Equal versions ("1.0", "0:1.00", "1.0-" ...) must hash alike. Equal versions always share
        # their non-digit characters (digit runs compare numerically, an absent run as 0), so
        # hash those and leave the numbers to __eq__.
        return hash(
            (self.epoch, _DIGIT_RUN.sub("", self.upstream), _DIGIT_RUN.sub("", self.revision))
        )

    def __repr__(self) -> str:
        rev = f"-{self.revision}" if self.revision else ""
        return f"DebianVersion('{self.epoch}:{self.upstream}{rev}')"


@functools.lru_cache(maxsize=65536)
def parse_debian(version: str) -> DebianVersion | None:
    try:
        return DebianVersion(version)
    except ValueError:
        return None


def compare_debian(a: str, b: str) -> int:
    """``dpkg --compare-versions`` as -1/0/1; ValueError when either is not a dpkg version."""
    c = DebianVersion(a).compare(DebianVersion(b))
    return (c > 0) - (c < 0)


# --- SemVer ---------------------------------------------------------------------------------------

_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


@functools.total_ordering
class SemVer:
    """Semantic Versioning 2.0.0 precedence: build metadata does not take part."""

    __slots__ = ("core", "prerelease")

    def __init__(self, text: str) -> None:
        m = _SEMVER.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a semantic version")
        self.core = (int(m[1]), int(m[2]), int(m[3]))
        self.prerelease: tuple[str, ...] = tuple(m[4].split(".")) if m[4] else ()

    def _key(self) -> tuple[tuple[int, int, int], int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all of its pre-releases; numeric identifiers sort before
        # alphanumeric ones; a longer list wins when all earlier identifiers are equal.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.core, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        pre = "-" + ".".join(self.prerelease) if self.prerelease else ""
        return f"SemVer('{'.'.join(map(str, self.core))}{pre}')"


@functools.lru_cache(maxsize=65536)
def parse_semver(version: str) -> SemVer | None:
    try:
        return SemVer(version)
    except ValueError:
        return None


# --- apk (Alpine) ---------------------------------------------------------------------------------

_APK = re.compile(
    r"^(\d+(?:\.\d+)*)([a-z]?)"
    r"((?:_(?:alpha|beta|pre|rc|cvs|svn|git|hg|p)\d*)*)"
    r"(?:~[0-9a-f]+)?(?:-r(\d+))?$"
)
#: apk-tools' suffix order: pre-releases before the plain version (0), the rest after it.
_APK_SUFFIXES = {
    "alpha": -4,
    "beta": -3,
    "pre": -2,
    "rc": -1,
    "cvs": 1,
    "svn": 2,
    "git": 3,
    "hg": 4,
    "p": 5,
}
_APK_SUFFIX = re.compile(r"_([a-z]+)(\d*)")

ApkKey: TypeAlias = tuple[tuple[int, ...], str, tuple[tuple[int, int], ...], int]


@functools.lru_cache(maxsize=65536)
def parse_apk(version: str) -> ApkKey | None:
    """An apk version (``1.2.4_rc1-r2``) as an ordered key, following apk-tools' comparison:
    numbers component by component (more components win), then the letter, then suffixes
    (``_alpha`` < ``_beta`` < ``_pre`` < ``_rc`` < none < ``_cvs`` ... ``_p``), then the ``-r``
    revision; a ``~hash`` is ignored. None when ``version`` is not an apk version."""
    m = _APK.match(version.strip())
    if not m:
        return None
    suffixes = tuple((_APK_SUFFIXES[s[1]], int(s[2] or 0)) for s in _APK_SUFFIX.finditer(m[3]))
    # The terminator (0, 0) makes "1.0" sort after "1.0_rc1" and before "1.0_p1".
    return (tuple(int(n) for n in m[1].split(".")), m[2], (*suffixes, (0, 0)), int(m[4] or 0))


# --- choosing -------------------------------------------------------------------------------------

#: OSV ecosystems whose ECOSYSTEM ranges follow SemVer precedence.
_SEMVER_ECOSYSTEMS = frozenset({"npm", "Go", "crates.io", "Hex", "Pub", "NuGet", "SwiftURL"})


def base_ecosystem(ecosystem: str) -> str:
    """``Debian:12`` -> ``Debian``: OSV appends the release after a colon."""
    return ecosystem.split(":", 1)[0]


def ordering_for(ecosystem: str) -> Parser | None:
    """The version parser for an OSV ecosystem's ECOSYSTEM ranges; None when we have none."""
    base = base_ecosystem(ecosystem)
    if base == "PyPI":
        return parse_pypi
    if base in ("Debian", "Ubuntu"):
        return parse_debian
    if base == "Alpine":
        return parse_apk
    if base in _SEMVER_ECOSYSTEMS:
        return parse_semver
    return None
