"""Version ordering: PEP 440, dpkg (checked against the real ``dpkg --compare-versions`` where
it exists), and SemVer 2.0.0 precedence."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.security import versions


def sign(n: int) -> int:
    return (n > 0) - (n < 0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param("1.0", "1.0.0", 0, id="trailing-zero-equal"),
        pytest.param("1.0rc1", "1.0", -1, id="rc-before-release"),
        pytest.param("1.0.dev1", "1.0a1", -1, id="dev-before-alpha"),
        pytest.param("1.0", "1.0.post1", -1, id="post-after-release"),
        pytest.param("1!0.1", "2.0", 1, id="epoch-wins"),
        pytest.param("2.0.6", "2.0.10", -1, id="numeric-not-lexical"),
        pytest.param("0.8.0-alpha2", "0.8.0a2", 0, id="normalized-alpha"),
        pytest.param("1.0+local.1", "1.0", 1, id="local-after-public"),
    ],
)
def test_pep440_ordering(a: str, b: str, expected: int) -> None:
    va, vb = versions.parse_pypi(a), versions.parse_pypi(b)
    assert va is not None
    assert vb is not None
    assert sign((va > vb) - (va < vb)) == expected


@pytest.mark.parametrize("text", ["2004d", "latest", "1.0-beta-final", ""], ids=repr)
def test_pep440_invalid_is_none(text: str) -> None:
    assert versions.parse_pypi(text) is None


DPKG_CASES = [
    pytest.param("1.0", "1.0", 0, id="equal"),
    pytest.param("1.0", "1.00", 0, id="leading-zeros-ignored"),
    pytest.param("0:1.0", "1.0", 0, id="epoch-zero-implicit"),
    pytest.param("1.0", "1.0-0", 0, id="empty-revision-is-zero"),
    pytest.param("1.0~rc1", "1.0", -1, id="tilde-before-release"),
    pytest.param("1.0~~", "1.0~~a", -1, id="double-tilde-first"),
    pytest.param("1.0~~a", "1.0~", -1, id="tilde-tilde-a-before-tilde"),
    pytest.param("1.0~", "1.0", -1, id="tilde-before-end"),
    pytest.param("1.0", "1.0a", -1, id="end-before-letter"),
    pytest.param("1.0a", "1.0.", -1, id="letter-before-punctuation"),
    pytest.param("1.0+dfsg", "1.0", 1, id="plus-after-end"),
    pytest.param("1:0.1", "2.0", 1, id="epoch-wins"),
    pytest.param("1.2.3", "1.2.10", -1, id="numeric-runs"),
    pytest.param("1.0-1", "1.0-2", -1, id="revision"),
    pytest.param("1.0-1", "1.0", 1, id="revision-after-none"),
    pytest.param("7.6p2-4", "7.6-0", 1, id="letters-in-upstream"),
    pytest.param("2.36-9+deb12u4", "2.36-9", 1, id="security-update-revision"),
    pytest.param("3.0.11-1~deb11u1", "3.0.11-1~deb12u1", -1, id="backport-suffixes"),
    pytest.param("1.2-3-4", "1.2-3", 1, id="hyphen-in-upstream"),
]


@pytest.mark.parametrize(("a", "b", "expected"), DPKG_CASES)
def test_dpkg_ordering(a: str, b: str, expected: int) -> None:
    assert versions.compare_debian(a, b) == expected
    assert versions.compare_debian(b, a) == -expected


DPKG = shutil.which("dpkg")


def dpkg_says(a: str, b: str) -> int:
    assert DPKG is not None
    for op, result in (("lt", -1), ("eq", 0)):
        if subprocess.run([DPKG, "--compare-versions", a, op, b], check=False).returncode == 0:
            return result
    return 1


@pytest.mark.skipif(DPKG is None, reason="dpkg not installed (not a Debian machine)")
@pytest.mark.parametrize(("a", "b", "expected"), DPKG_CASES)
def test_dpkg_table_matches_real_dpkg(a: str, b: str, expected: int) -> None:
    assert dpkg_says(a, b) == expected


_dpkg_part = st.text(alphabet="0123456789.+~abz", min_size=1, max_size=8)
_dpkg_version = st.builds(
    lambda epoch, up, rev: f"{epoch}{up}{rev}",
    st.sampled_from(["", "1:", "0:"]),
    st.builds(lambda d, rest: d + rest, st.sampled_from("0123456789"), _dpkg_part),
    st.one_of(
        st.just(""),
        st.builds(lambda r: "-" + r, st.text(alphabet="0123456789.+~ab", min_size=1, max_size=5)),
    ),
)


@pytest.mark.skipif(DPKG is None, reason="dpkg not installed (not a Debian machine)")
@settings(max_examples=40, deadline=None)
@given(_dpkg_version, _dpkg_version)
def test_dpkg_matches_real_dpkg_on_random_versions(a: str, b: str) -> None:
    assert versions.compare_debian(a, b) == dpkg_says(a, b)


@given(_dpkg_version, _dpkg_version)
def test_dpkg_equal_versions_hash_alike(a: str, b: str) -> None:
    va, vb = versions.DebianVersion(a), versions.DebianVersion(b)
    if va == vb:
        assert hash(va) == hash(vb)
    assert (va < vb) == (vb > va)


@pytest.mark.parametrize("text", ["", "a1.0", "x:1.0", "1.0-", "1 .0"], ids=repr)
def test_dpkg_invalid(text: str) -> None:
    assert versions.parse_debian(text) is None
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the defect
        versions.compare_debian(text, "1.0")


SEMVER_PRECEDENCE = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.10.0",
    "2.0.0",
]


def test_semver_spec_precedence_example() -> None:
    parsed = [versions.parse_semver(v) for v in SEMVER_PRECEDENCE]
    assert all(p is not None for p in parsed)
    shuffled = list(reversed(SEMVER_PRECEDENCE))
    assert sorted(shuffled, key=versions.SemVer) == SEMVER_PRECEDENCE


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param("1.0.0+build.1", "1.0.0+build.2", id="build-metadata-ignored"),
        pytest.param("v1.2.3", "1.2.3", id="go-style-v-prefix"),
    ],
)
def test_semver_equal(a: str, b: str) -> None:
    assert versions.SemVer(a) == versions.SemVer(b)


@pytest.mark.parametrize("text", ["1.2", "01.2.3", "1.2.3-", "1.2.3-01", "latest"], ids=repr)
def test_semver_invalid(text: str) -> None:
    assert versions.parse_semver(text) is None


@pytest.mark.parametrize(
    ("ecosystem", "parser"),
    [
        pytest.param("PyPI", versions.parse_pypi, id="pypi"),
        pytest.param("Debian:12", versions.parse_debian, id="debian-release"),
        pytest.param("npm", versions.parse_semver, id="npm"),
        pytest.param("Go", versions.parse_semver, id="go"),
        pytest.param("Maven", None, id="unsupported"),
    ],
)
def test_ordering_for(ecosystem: str, parser: object) -> None:
    assert versions.ordering_for(ecosystem) is parser
