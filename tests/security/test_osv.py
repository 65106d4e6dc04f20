"""Loading OSV databases (tree, zip, YAML/JSON, corrupt and withdrawn files, the JSON cache) and
the affected-range semantics, on hand-written advisories and on the real PyPA database."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from shipyard.errors import InvalidInput
from shipyard.security import osv

from .conftest import WriteDb, advisory


def one_affected(db: osv.OsvDatabase, name: str, ecosystem: str = "PyPI") -> osv.Affected:
    entries = db.lookup(ecosystem, name)
    assert len(entries) == 1
    return entries[0][1]


RANGE_CASES = [
    # (events, version, affected)
    *[
        pytest.param(
            [{"introduced": "0"}, {"fixed": "1.2.0"}, {"introduced": "2.0.0"}, {"fixed": "2.1.0"}],
            v,
            hit,
            id=f"two-intervals-{v}",
        )
        for v, hit in [
            ("0.1", True),
            ("1.1.9", True),
            ("1.2.0", False),
            ("1.5", False),
            ("2.0.0", True),
            ("2.0.9", True),
            ("2.1.0", False),
            ("3.0", False),
        ]
    ],
    *[
        pytest.param(
            [{"introduced": "1.0"}, {"last_affected": "1.4"}], v, hit, id=f"last-affected-{v}"
        )
        for v, hit in [
            ("0.9", False),
            ("1.0", True),
            ("1.4", True),
            ("1.4.post1", False),
            ("1.5", False),
        ]
    ],
    *[
        # Events out of order (as in PYSEC-2023-192): evaluation sorts them first.
        pytest.param(
            [
                {"introduced": "2.0.0"},
                {"fixed": "2.0.6"},
                {"introduced": "0"},
                {"fixed": "1.26.17"},
            ],
            v,
            hit,
            id=f"unsorted-events-{v}",
        )
        for v, hit in [
            ("1.26.16", True),
            ("1.26.17", False),
            ("1.26.20", False),
            ("2.0.5", True),
            ("2.0.6", False),
        ]
    ],
    *[
        pytest.param([{"introduced": "3.0"}], v, hit, id=f"open-ended-{v}")
        for v, hit in [("2.9", False), ("3.0", True), ("99.0", True)]
    ],
    pytest.param(
        [{"introduced": "0"}, {"fixed": "2.0.0"}], "2.0.0rc1", True, id="prerelease-before-fix"
    ),
    pytest.param(
        [{"introduced": "0"}, {"fixed": "2.0.0"}], "2.0.0.post1", False, id="post-release-after-fix"
    ),
    pytest.param([{"introduced": "1.0"}, {"limit": "1.5"}], "1.6", False, id="limit-caps"),
    pytest.param([{"introduced": "1.0"}, {"limit": "1.5"}], "1.2", True, id="limit-inside"),
    pytest.param(
        [{"introduced": "0"}, {"fixed": "1.0"}], "not a version", False, id="unparseable-installed"
    ),
]


@pytest.mark.parametrize(("events", "version", "affected"), RANGE_CASES)
def test_ecosystem_ranges(
    write_db: WriteDb, events: list[dict[str, str]], version: str, affected: bool
) -> None:
    db = osv.parse_database(write_db(advisory("T-1", "pkg", events=events)))
    assert one_affected(db, "pkg").contains(version) is affected


@pytest.mark.parametrize(
    ("version", "affected"),
    [("1.0", True), ("1.0.0", True), ("1.1", True), ("1.2", False), ("0.9", False)],
    ids=lambda v: str(v),
)
def test_explicit_versions_list(write_db: WriteDb, version: str, affected: bool) -> None:
    # "1.0.0" is the same PEP 440 version as the listed "1.0".
    db = osv.parse_database(write_db(advisory("T-1", "pkg", versions=["1.0", "1.1"])))
    assert one_affected(db, "pkg").contains(version) is affected


@pytest.mark.parametrize(
    ("version", "affected"),
    [("1.0.0", True), ("1.1.9", True), ("1.2.0-beta.1", True), ("1.2.0", False), ("0.9.9", False)],
    ids=lambda v: str(v),
)
def test_semver_ranges(write_db: WriteDb, version: str, affected: bool) -> None:
    doc = advisory(
        "T-1",
        "left-pad",
        ecosystem="npm",
        range_type="SEMVER",
        events=[{"introduced": "1.0.0"}, {"fixed": "1.2.0"}],
    )
    db = osv.parse_database(write_db(doc))
    assert one_affected(db, "left-pad", "npm").contains(version) is affected


def test_git_ranges_are_ignored(write_db: WriteDb) -> None:
    doc = advisory(
        "T-1", "pkg", range_type="GIT", events=[{"introduced": "0"}, {"fixed": "abc123"}]
    )
    db = osv.parse_database(write_db(doc))
    aff = one_affected(db, "pkg")
    assert aff.ranges == ()
    assert not aff.contains("1.0")


def test_unorderable_range_falls_back_to_versions_list(write_db: WriteDb) -> None:
    doc = advisory(
        "T-1", "pkg", events=[{"introduced": "0"}, {"fixed": "next-release"}], versions=["1.0"]
    )
    aff = one_affected(osv.parse_database(write_db(doc)), "pkg")
    assert aff.contains("1.0")
    assert not aff.contains("1.1")  # the range cannot be evaluated, so it covers nothing


@pytest.mark.parametrize(
    ("version", "affected"),
    [
        ("3.0.9-1", True),
        ("3.0.11-1~deb12u1", False),
        ("3.0.11-1~deb11u1", True),
        ("3.0.11-1", False),
    ],
    ids=lambda v: str(v),
)
def test_debian_ranges_use_dpkg_ordering(write_db: WriteDb, version: str, affected: bool) -> None:
    doc = advisory(
        "DSA-1",
        "openssl",
        ecosystem="Debian:12",
        events=[{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u1"}],
    )
    aff = one_affected(osv.parse_database(write_db(doc)), "openssl", "Debian")
    assert aff.contains(version) is affected


def test_fixed_above(write_db: WriteDb) -> None:
    doc = advisory(
        "T-1",
        "pkg",
        events=[
            {"introduced": "0"},
            {"fixed": "3.2.25"},
            {"introduced": "4.0"},
            {"fixed": "4.2.11"},
            {"introduced": "5.0"},
            {"fixed": "5.0.3"},
        ],
    )
    aff = one_affected(osv.parse_database(write_db(doc)), "pkg")
    assert aff.fixed_above("4.2.5") == ["4.2.11", "5.0.3"]
    assert aff.fixed_above("1.0") == ["3.2.25", "4.2.11", "5.0.3"]


def test_names_are_indexed_pep503(write_db: WriteDb) -> None:
    db = osv.parse_database(write_db(advisory("T-1", "Foo_Bar.baz", events=[{"introduced": "0"}])))
    for spelling in ("foo-bar-baz", "FOO.BAR_BAZ", "foo__bar-baz"):
        assert [a.id for a, _ in db.lookup("PyPI", spelling)] == ["T-1"]


def test_yaml_scalars_stay_strings(write_db: WriteDb) -> None:
    # Unquoted 1.10 is the float 1.1 to a default YAML loader; here it must stay "1.10".
    text = """\
id: Y-1
modified: 2024-01-01T00:00:00Z
affected:
- package: {ecosystem: PyPI, name: pkg}
  ranges:
  - type: ECOSYSTEM
    events:
    - introduced: 0
    - fixed: 1.10
"""
    db = osv.parse_database(write_db(raw={"vulns/pkg/Y-1.yaml": text}))
    aff = one_affected(db, "pkg")
    assert [e.version for e in aff.ranges[0].events] == ["0", "1.10"]
    assert aff.contains("1.9")
    assert not aff.contains("1.10")
    assert db.advisories[0].modified == "2024-01-01T00:00:00Z"


BAD_FILES = {
    "broken.yaml": ("id: X\naffected: [\n", "not valid YAML"),
    "broken.json": ('{"id": "X",', "not valid JSON"),
    "list.json": ("[1, 2]", "top level must be an object"),
    "noid.json": ('{"affected": []}', "id must be a non-empty string"),
    "affected.json": ('{"id": "X-2", "affected": "oops"}', "affected must be a list"),
    "event.json": (
        json.dumps(advisory("X-3", "p", events=[{"introduced": "0", "fixed": "1"}])),
        "must be an object with one key",
    ),
    "kind.json": (
        json.dumps(advisory("X-4", "p", events=[{"patched": "1"}])),
        "unknown event 'patched'",
    ),
    "nopkg.json": (
        '{"id": "X-5", "affected": [{"ranges": []}]}',
        "affected[0].package must be an object",
    ),
}


def test_corrupt_files_are_reported_and_skipped(write_db: WriteDb) -> None:
    good = advisory("GOOD-1", "pkg", events=[{"introduced": "0"}])
    root = write_db(good, raw={name: text for name, (text, _) in BAD_FILES.items()})
    db = osv.parse_database(root)
    assert [a.id for a in db.advisories] == ["GOOD-1"]
    problems = {Path(p.path).name: p.reason for p in db.problems}
    assert set(problems) == set(BAD_FILES)
    for name, (_, reason) in BAD_FILES.items():
        assert reason in problems[name], name
    assert db.files == len(BAD_FILES) + 1


def test_withdrawn_advisories_are_ignored_and_counted(write_db: WriteDb) -> None:
    root = write_db(
        advisory("W-1", "pkg", events=[{"introduced": "0"}], withdrawn="2024-02-01T00:00:00Z"),
        advisory("A-1", "pkg", events=[{"introduced": "0"}, {"fixed": "2.0"}]),
    )
    db = osv.parse_database(root)
    assert [a.id for a, _ in db.lookup("PyPI", "pkg")] == ["A-1"]
    assert db.withdrawn == 1
    assert db.problems == ()


def test_duplicate_ids_keep_the_first(write_db: WriteDb) -> None:
    root = write_db(
        advisory("D-1", "pkg", versions=["1.0"]), advisory("D-1", "pkg", versions=["2.0"])
    )
    db = osv.parse_database(root)
    assert len(db.advisories) == 1
    assert "duplicate advisory id D-1" in db.problems[0].reason


def test_zip_database(write_db: WriteDb, tmp_path: Path) -> None:
    root = write_db(
        advisory("Z-1", "pkg", events=[{"introduced": "0"}, {"fixed": "1.0"}]),
        raw={"bad.json": "{"},
    )
    archive = tmp_path / "osv.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(root.iterdir()):
            zf.write(f, f"PyPI/{f.name}")
    db = osv.parse_database(archive)
    assert [a.id for a in db.advisories] == ["Z-1"]
    assert db.problems[0].path == f"{archive}!PyPI/bad.json"
    assert one_affected(db, "pkg").contains("0.9")


@pytest.mark.parametrize("kind", ["missing", "empty", "not-zip"])
def test_unusable_database_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db"
    if kind == "empty":
        path.mkdir()
    elif kind == "not-zip":
        path = tmp_path / "db.zip"
        path.write_text("not a zip")
    with pytest.raises(InvalidInput, match=str(path)):
        osv.load(path)


def test_cache_round_trip_and_invalidation(write_db: WriteDb, tmp_path: Path) -> None:
    root = write_db(
        advisory("C-1", "pkg", events=[{"introduced": "0"}, {"fixed": "1.0"}], aliases=["CVE-1"])
    )
    cache = tmp_path / "cache"
    first = osv.load(root, cache_dir=cache)
    second = osv.load(root, cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    a1, a2 = first.advisories[0], second.advisories[0]
    assert (a2.id, a2.aliases, a2.summary, a2.source) == (a1.id, a1.aliases, a1.summary, a1.source)
    assert second.lookup("PyPI", "pkg")[0][1].contains("0.5")
    # Change the database: the cache is stale and must not be used.
    (root / "new.json").write_text(json.dumps(advisory("C-2", "pkg", versions=["5.0"])))
    third = osv.load(root, cache_dir=cache)
    assert third.from_cache is False
    assert {a.id for a in third.advisories} == {"C-1", "C-2"}


def test_corrupt_cache_is_rebuilt(write_db: WriteDb, tmp_path: Path) -> None:
    root = write_db(advisory("C-1", "pkg", versions=["1.0"]))
    cache = tmp_path / "cache"
    osv.load(root, cache_dir=cache)
    osv.cache_file(root, cache).write_text('{"format": 1, "fingerprint": "x", "advisories": [[')
    db = osv.load(root, cache_dir=cache)
    assert [a.id for a in db.advisories] == ["C-1"]
    assert osv.load(root, cache_dir=cache).from_cache is True


def test_load_shared_reuses_until_files_change(write_db: WriteDb) -> None:
    root = write_db(advisory("S-1", "pkg", versions=["1.0"]))
    try:
        first = osv.load_shared(root)
        assert osv.load_shared(root) is first
        f = next(root.glob("*.json"))
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert osv.load_shared(root) is not first
    finally:
        osv.clear_shared()


# --- the real PyPA advisory database --------------------------------------------------------------


def test_pypa_db_loads_completely(pypa_db: osv.OsvDatabase) -> None:
    assert len(pypa_db.advisories) > 2600
    assert pypa_db.withdrawn == 10
    assert pypa_db.problems == ()
    assert pypa_db.packages > 600
    # PYSEC-2023-73 (redis) is withdrawn: never reported.
    assert "PYSEC-2023-73" not in {a.id for a in pypa_db.advisories}


@pytest.mark.parametrize(
    ("package", "version", "advisory_id", "affected"),
    [
        pytest.param("requests", "2.2.0", "PYSEC-2014-13", True, id="requests-before-fix"),
        pytest.param("requests", "2.3.0", "PYSEC-2014-13", False, id="requests-fixed"),
        pytest.param("urllib3", "2.0.5", "PYSEC-2023-192", True, id="urllib3-2x-interval"),
        pytest.param("urllib3", "2.0.6", "PYSEC-2023-192", False, id="urllib3-2x-fixed"),
        pytest.param("urllib3", "1.26.16", "PYSEC-2023-192", True, id="urllib3-1x-interval"),
        pytest.param("urllib3", "1.26.17", "PYSEC-2023-192", False, id="urllib3-1x-fixed"),
        pytest.param("werkzeug", "3.0.0", "PYSEC-2023-221", True, id="werkzeug-3.0.0"),
        pytest.param("Werkzeug", "2.3.8", "PYSEC-2023-221", False, id="werkzeug-2.3.8-fixed"),
        pytest.param("py", "1.11.0", "PYSEC-2022-42969", True, id="py-last-affected"),
        pytest.param("py", "1.11.1", "PYSEC-2022-42969", False, id="py-after-last-affected"),
        pytest.param("duckdb", "0.9.2", "PYSEC-2024-25", True, id="duckdb-before-dev-fix"),
        pytest.param("duckdb", "0.9.3.dev6", "PYSEC-2024-25", False, id="duckdb-dev-fix"),
    ],
)
def test_real_advisories(
    pypa_db: osv.OsvDatabase, package: str, version: str, advisory_id: str, affected: bool
) -> None:
    ids = {a.id for a, _ in pypa_db.affecting("PyPI", package, version)}
    assert (advisory_id in ids) is affected


def test_pypa_cache_matches_parse(
    pypa_db_path: Path, osv_cache_dir: Path, pypa_db: osv.OsvDatabase
) -> None:
    warm = osv.load(pypa_db_path, cache_dir=osv_cache_dir)
    assert warm.from_cache is True

    def shape(db: osv.OsvDatabase) -> set[tuple[str, str, int, int]]:
        return {
            (a.id, f.name, len(f.versions), len(f.ranges))
            for a in db.advisories
            for f in a.affected
        }

    assert shape(warm) == shape(pypa_db)
