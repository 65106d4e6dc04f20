"""An offline OSV vulnerability database: loading, indexing and the affected-range semantics.

The database is a directory tree or a ``.zip`` of OSV documents (JSON or YAML, one advisory per
file; the PyPA advisory database is YAML under ``vulns/<package>/``). A file that cannot be parsed
or breaks the OSV schema is reported in ``OsvDatabase.problems`` (path + reason) and skipped; a
withdrawn advisory is counted and ignored. Advisories are indexed by (ecosystem, normalized
package name).

Affected semantics follow the OSV schema's evaluation rules: an ``affected`` entry covers a
version when the version is listed in ``versions`` or falls inside one of its ``ECOSYSTEM`` or
``SEMVER`` ranges. A range's events are sorted by version; walking them, ``introduced`` (``"0"``
is the beginning of time) opens an interval, ``fixed`` closes it before the fixed version,
``last_affected`` closes it after that version, ``limit`` caps it. Several intervals per range are
allowed. ``GIT`` ranges are commit hashes and are ignored here.

Parsing the whole PyPA database takes seconds, so the parsed form is cached as JSON in a cache
directory, keyed by the database files' paths, sizes and mtimes (``load``); ``load_shared`` also
keeps one loaded database per process. Called by ``scanning.py``, the gate and ``shipyard vulndb``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shipyard.errors import InvalidInput
from shipyard.security import versions as ordering
from shipyard.security.inventory import normalize_name

SUFFIXES = (".json", ".yaml", ".yml")
#: Bumped whenever the cached JSON layout changes, so old caches are rebuilt, never misread.
CACHE_FORMAT = 1
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
_EVENT_KINDS = ("introduced", "fixed", "last_affected", "limit")
_EVALUATED_RANGES = ("ECOSYSTEM", "SEMVER")


class DatabaseError(InvalidInput):
    """The database path is missing or holds no OSV documents at all."""


# --- YAML: scalars stay strings -------------------------------------------------------------------

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _OsvLoader(_BaseLoader):  # type: ignore[misc]
    """YAML's implicit typing turns ``fixed: 1.10`` into the float 1.1 and timestamps into
    datetimes; OSV versions and dates are strings, so only null and booleans are resolved."""


_OsvLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    kind: str  # introduced | fixed | last_affected | limit
    version: str


@dataclass(frozen=True)
class Range:
    type: str  # ECOSYSTEM or SEMVER (GIT ranges are dropped at load)
    events: tuple[Event, ...]


#: A usable range: its type and its events parsed and sorted as (version key or None for "0", kind).
_Compiled = tuple[str, tuple[tuple[Any, str], ...]]


@dataclass(frozen=True, eq=False)
class Affected:
    """One ``affected[]`` entry: a package and the versions of it an advisory covers."""

    ecosystem: str  # as written, e.g. "PyPI" or "Debian:12"
    name: str  # normalized (PEP 503 for PyPI)
    ranges: tuple[Range, ...]
    versions: tuple[str, ...]  # the explicit ``versions`` list, as written

    def _parser(self, range_type: str) -> ordering.Parser | None:
        if range_type == "SEMVER":
            return ordering.parse_semver
        return ordering.ordering_for(self.ecosystem)

    @functools.cached_property
    def _compiled(self) -> tuple[tuple[_Compiled, ...], frozenset[str], frozenset[Any]]:
        """Ranges with parsed, sorted events (unorderable ranges dropped) and the parsed
        ``versions`` list. Computed on first use: a scan touches few entries of a large DB."""
        ranges: list[_Compiled] = []
        for rng in self.ranges:
            parse = self._parser(rng.type)
            if parse is None:
                continue
            events: list[tuple[Any, str]] = []
            for ev in rng.events:
                key = None if ev.kind == "introduced" and ev.version == "0" else parse(ev.version)
                if key is None and not (ev.kind == "introduced" and ev.version == "0"):
                    events = []  # one unorderable bound makes the whole range unusable
                    break
                events.append((key, ev.kind))
            if events:
                # "0" first, then by version; the sort is stable for equal versions.
                events.sort(key=functools.cmp_to_key(_cmp_event))
                ranges.append((rng.type, tuple(events)))
        # PEP 440 equality is looser than string equality ("1.0" == "1.0.0"): compare parsed too.
        listed: frozenset[Any] = frozenset()
        if ordering.base_ecosystem(self.ecosystem) == "PyPI":
            listed = frozenset(k for k in map(ordering.parse_pypi, self.versions) if k is not None)
        return tuple(ranges), frozenset(self.versions), listed

    def contains(self, version: str) -> bool:
        """Whether ``version`` is affected, per the OSV evaluation rules."""
        ranges, listed_raw, listed = self._compiled
        if version in listed_raw:
            return True
        eco = ordering.ordering_for(self.ecosystem)
        eco_key = eco(version) if eco is not None else None
        if eco_key is not None and eco_key in listed:
            return True
        for range_type, events in ranges:
            key = ordering.parse_semver(version) if range_type == "SEMVER" else eco_key
            if key is not None and _in_range(key, events):
                return True
        return False

    def fixed_above(self, version: str) -> list[str]:
        """The ``fixed`` versions of this entry above ``version``, lowest first."""
        found: dict[str, Any] = {}
        for rng in self.ranges:
            parse = self._parser(rng.type)
            if parse is None:
                continue
            current = parse(version)
            for ev in rng.events:
                key = parse(ev.version) if ev.kind == "fixed" else None
                if key is not None and (current is None or key > current):
                    found.setdefault(ev.version, key)
        try:
            return sorted(found, key=lambda v: found[v])
        except TypeError:  # SEMVER and ECOSYSTEM keys mixed: keep the database's order
            return list(found)


def _cmp_event(a: tuple[Any, str], b: tuple[Any, str]) -> int:
    ka, kb = a[0], b[0]
    if ka is None or kb is None:
        return (ka is not None) - (kb is not None)
    return -1 if ka < kb else (1 if ka > kb else 0)


def _in_range(version: Any, events: tuple[tuple[Any, str], ...]) -> bool:
    affected = False
    for key, kind in events:
        if kind == "introduced":
            if key is None or version >= key:
                affected = True
        elif kind == "fixed" or kind == "limit":
            if version >= key:
                affected = False
        elif kind == "last_affected" and version > key:
            affected = False
    return affected


@dataclass(frozen=True)
class SeverityEntry:
    type: str  # CVSS_V2, CVSS_V3, CVSS_V4, Ubuntu
    score: str


@dataclass(frozen=True, eq=False)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str
    published: str | None
    modified: str | None
    severity: tuple[SeverityEntry, ...]
    #: ``database_specific.severity`` (GHSA writes LOW/MODERATE/HIGH/CRITICAL), when present.
    database_severity: str | None
    affected: tuple[Affected, ...]
    source: str  # file the advisory came from

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))


@dataclass(frozen=True)
class LoadProblem:
    path: str
    reason: str


@dataclass(frozen=True)
class DatabaseStats:
    path: str
    files: int
    advisories: int
    packages: int
    withdrawn: int
    problems: tuple[LoadProblem, ...]
    load_seconds: float
    from_cache: bool
    ecosystems: Mapping[str, int]


class OsvDatabase:
    """Loaded advisories indexed by (base ecosystem, normalized package name)."""

    def __init__(
        self,
        path: str,
        advisories: Sequence[Advisory],
        *,
        files: int,
        withdrawn: int,
        problems: Sequence[LoadProblem],
        load_seconds: float = 0.0,
        from_cache: bool = False,
    ) -> None:
        self.path = path
        self.advisories = tuple(advisories)
        self.files = files
        self.withdrawn = withdrawn
        self.problems = tuple(problems)
        self.load_seconds = load_seconds
        self.from_cache = from_cache
        index: dict[tuple[str, str], list[tuple[Advisory, Affected]]] = {}
        for adv in self.advisories:
            for aff in adv.affected:
                key = (ordering.base_ecosystem(aff.ecosystem), aff.name)
                index.setdefault(key, []).append((adv, aff))
        self._index = {k: tuple(v) for k, v in index.items()}

    def lookup(self, ecosystem: str, name: str) -> tuple[tuple[Advisory, Affected], ...]:
        """Every (advisory, affected entry) about this package, whatever the version."""
        eco = ordering.base_ecosystem(ecosystem)
        return self._index.get((eco, index_name(eco, name)), ())

    def affecting(self, ecosystem: str, name: str, version: str) -> list[tuple[Advisory, Affected]]:
        """The advisories whose affected entries cover ``version`` of the package."""
        return [(a, aff) for a, aff in self.lookup(ecosystem, name) if aff.contains(version)]

    @property
    def packages(self) -> int:
        return len(self._index)

    def stats(self) -> DatabaseStats:
        ecosystems: dict[str, int] = {}
        for eco, _ in self._index:
            ecosystems[eco] = ecosystems.get(eco, 0) + 1
        return DatabaseStats(
            path=self.path,
            files=self.files,
            advisories=len(self.advisories),
            packages=self.packages,
            withdrawn=self.withdrawn,
            problems=self.problems,
            load_seconds=self.load_seconds,
            from_cache=self.from_cache,
            ecosystems=ecosystems,
        )


def index_name(ecosystem: str, name: str) -> str:
    base = ordering.base_ecosystem(ecosystem)
    if base == "PyPI":
        return normalize_name(name)
    if base in ("Debian", "Ubuntu", "Alpine"):
        return name.lower()
    return name


# --- parsing one document -------------------------------------------------------------------------


class _Corrupt(Exception):
    pass


class _Withdrawn(Exception):
    pass


def _str(value: Any, where: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise _Corrupt(f"{where} must be a non-empty string, got {type(value).__name__} {value!r:.40}")


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    raise _Corrupt(f"{where} must be a list, got {type(value).__name__}")


def advisory_from_document(doc: Any, source: str) -> Advisory:
    """Validate one OSV document; raises _Withdrawn or _Corrupt (module-internal)."""
    if not isinstance(doc, dict):
        raise _Corrupt(f"top level must be an object, got {type(doc).__name__}")
    adv_id = _str(doc.get("id"), "id")
    if doc.get("withdrawn"):
        raise _Withdrawn(adv_id)
    aliases = tuple(_str(a, "aliases[]") for a in _list(doc.get("aliases"), "aliases"))
    severity: list[SeverityEntry] = []
    for i, sev in enumerate(_list(doc.get("severity"), "severity")):
        if not isinstance(sev, dict):
            raise _Corrupt(f"severity[{i}] must be an object")
        severity.append(
            SeverityEntry(
                _str(sev.get("type"), f"severity[{i}].type"),
                _str(sev.get("score"), f"severity[{i}].score"),
            )
        )
    db_specific = doc.get("database_specific")
    db_sev = db_specific.get("severity") if isinstance(db_specific, dict) else None
    affected: list[Affected] = []
    for i, aff in enumerate(_list(doc.get("affected"), "affected")):
        where = f"affected[{i}]"
        if not isinstance(aff, dict):
            raise _Corrupt(f"{where} must be an object")
        pkg = aff.get("package")
        if not isinstance(pkg, dict):
            raise _Corrupt(f"{where}.package must be an object")
        ecosystem = _str(pkg.get("ecosystem"), f"{where}.package.ecosystem")
        name = _str(pkg.get("name"), f"{where}.package.name")
        ranges: list[Range] = []
        for j, rng in enumerate(_list(aff.get("ranges"), f"{where}.ranges")):
            rwhere = f"{where}.ranges[{j}]"
            if not isinstance(rng, dict):
                raise _Corrupt(f"{rwhere} must be an object")
            rtype = _str(rng.get("type"), f"{rwhere}.type")
            events: list[Event] = []
            for k, ev in enumerate(_list(rng.get("events"), f"{rwhere}.events")):
                if not isinstance(ev, dict) or len(ev) != 1:
                    raise _Corrupt(f"{rwhere}.events[{k}] must be an object with one key")
                ((kind, version),) = ev.items()
                if kind not in _EVENT_KINDS:
                    raise _Corrupt(f"{rwhere}.events[{k}]: unknown event {kind!r}")
                events.append(Event(kind, _str(version, f"{rwhere}.events[{k}].{kind}")))
            if rtype in _EVALUATED_RANGES:
                ranges.append(Range(rtype, tuple(events)))
        listed = tuple(
            _str(v, f"{where}.versions[]") for v in _list(aff.get("versions"), f"{where}.versions")
        )
        affected.append(Affected(ecosystem, index_name(ecosystem, name), tuple(ranges), listed))
    summary = doc.get("summary") or doc.get("details") or ""
    if not isinstance(summary, str):
        raise _Corrupt("summary/details must be a string")
    first_line = summary.strip().split("\n", 1)[0]
    return Advisory(
        id=adv_id,
        aliases=aliases,
        summary=first_line[:200],
        published=_opt_str(doc.get("published")),
        modified=_opt_str(doc.get("modified")),
        severity=tuple(severity),
        database_severity=db_sev if isinstance(db_sev, str) else None,
        affected=tuple(affected),
        source=source,
    )


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_document(data: bytes, name: str) -> Any:
    if name.endswith(".json"):
        return json.loads(data)
    return yaml.load(data, Loader=_OsvLoader)  # noqa: S506 - _OsvLoader derives from SafeLoader


# --- loading a database ---------------------------------------------------------------------------


def _iter_tree(root: Path) -> Iterator[tuple[str, os.stat_result, Path]]:
    """(path relative to root, stat, path) of every OSV file, in a stable order."""
    stack = [""]
    base = str(root)
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                if entry.is_dir():
                    subdirs.append(rel)
                elif entry.name.endswith(SUFFIXES):
                    yield rel, entry.stat(), Path(entry.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def fingerprint(path: Path) -> str:
    """Changes whenever a database file is added, removed, resized or touched."""
    h = hashlib.sha256(f"osv-cache-{CACHE_FORMAT}\0{path.resolve()}\0".encode())
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    else:
        for rel, st, _ in _iter_tree(path):
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _documents(path: Path) -> Iterator[tuple[str, bytes | LoadProblem]]:
    if path.is_dir():
        for _rel, st, p in _iter_tree(path):
            if st.st_size > MAX_DOCUMENT_BYTES:
                yield str(p), LoadProblem(str(p), f"larger than {MAX_DOCUMENT_BYTES} bytes")
                continue
            try:
                yield str(p), p.read_bytes()
            except OSError as exc:
                yield str(p), LoadProblem(str(p), f"unreadable: {exc.strerror or exc}")
        return
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatabaseError(f"{path}: not a readable zip archive of OSV files: {exc}") from exc
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not info.filename.endswith(SUFFIXES) or base.startswith("."):
                continue
            where = f"{path}!{info.filename}"
            if info.file_size > MAX_DOCUMENT_BYTES:
                yield where, LoadProblem(where, f"larger than {MAX_DOCUMENT_BYTES} bytes")
                continue
            try:
                yield where, zf.read(info)
            except (OSError, zipfile.BadZipFile, ValueError) as exc:
                yield where, LoadProblem(where, f"unreadable zip member: {exc}")


@contextlib.contextmanager
def _bulk_allocation() -> Iterator[None]:
    """Pause the cyclic GC while building hundreds of thousands of objects: otherwise each
    collection rescans everything already alive (seconds, when a database is loaded)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_database(path: Path) -> OsvDatabase:
    """Read and validate every OSV document under ``path`` (no cache)."""
    with _bulk_allocation():
        return _parse_database(path)


def _parse_database(path: Path) -> OsvDatabase:
    started = time.perf_counter()
    if not path.exists():
        raise DatabaseError(f"OSV database {path} does not exist")
    advisories: list[Advisory] = []
    problems: list[LoadProblem] = []
    seen: dict[str, str] = {}
    files = withdrawn = 0
    for where, data in _documents(path):
        files += 1
        if isinstance(data, LoadProblem):
            problems.append(data)
            continue
        try:
            adv = advisory_from_document(parse_document(data, where), where)
        except _Withdrawn:
            withdrawn += 1
            continue
        except _Corrupt as exc:
            problems.append(LoadProblem(where, str(exc)))
            continue
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            reason = str(exc).replace("\n", " ")
            problems.append(
                LoadProblem(
                    where,
                    f"not valid {'JSON' if where.endswith('.json') else 'YAML'}: {reason[:300]}",
                )
            )
            continue
        if adv.id in seen:
            problems.append(
                LoadProblem(where, f"duplicate advisory id {adv.id} (kept {seen[adv.id]})")
            )
            continue
        seen[adv.id] = where
        advisories.append(adv)
    if files == 0:
        raise DatabaseError(f"OSV database {path} holds no .json/.yaml advisory files")
    return OsvDatabase(
        str(path),
        advisories,
        files=files,
        withdrawn=withdrawn,
        problems=problems,
        load_seconds=time.perf_counter() - started,
    )


# --- the JSON cache -------------------------------------------------------------------------------


def _encode(db: OsvDatabase, fp: str) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "path": db.path,
        "files": db.files,
        "withdrawn": db.withdrawn,
        "problems": [[p.path, p.reason] for p in db.problems],
        "advisories": [
            [
                a.id,
                list(a.aliases),
                a.summary,
                a.published,
                a.modified,
                [[s.type, s.score] for s in a.severity],
                a.database_severity,
                [
                    [
                        f.ecosystem,
                        f.name,
                        [[r.type, [[e.kind, e.version] for e in r.events]] for r in f.ranges],
                        list(f.versions),
                    ]
                    for f in a.affected
                ],
                a.source,
            ]
            for a in db.advisories
        ],
    }


def _decode(data: dict[str, Any], started: float) -> OsvDatabase:
    advisories = [
        Advisory(
            id=a[0],
            aliases=tuple(a[1]),
            summary=a[2],
            published=a[3],
            modified=a[4],
            severity=tuple(SeverityEntry(t, s) for t, s in a[5]),
            database_severity=a[6],
            affected=tuple(
                Affected(
                    eco,
                    name,
                    tuple(Range(t, tuple(Event(k, v) for k, v in evs)) for t, evs in rngs),
                    tuple(vers),
                )
                for eco, name, rngs, vers in a[7]
            ),
            source=a[8],
        )
        for a in data["advisories"]
    ]
    return OsvDatabase(
        data["path"],
        advisories,
        files=data["files"],
        withdrawn=data["withdrawn"],
        problems=[LoadProblem(p, r) for p, r in data["problems"]],
        load_seconds=time.perf_counter() - started,
        from_cache=True,
    )


def cache_file(path: Path, cache_dir: Path) -> Path:
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"osv-{tag}.json"


def load(path: Path, *, cache_dir: Path | None = None) -> OsvDatabase:
    """Load the database at ``path``, from ``cache_dir``'s parsed copy when the files are
    unchanged (same paths, sizes, mtimes), else parse and refresh the cache."""
    started = time.perf_counter()
    if not path.exists():
        raise DatabaseError(f"OSV database {path} does not exist")
    if cache_dir is None:
        return parse_database(path)
    fp = fingerprint(path)
    target = cache_file(path, cache_dir)
    try:
        with _bulk_allocation():
            data = json.loads(target.read_bytes())
            if (
                isinstance(data, dict)
                and data.get("format") == CACHE_FORMAT
                and data.get("fingerprint") == fp
            ):
                return _decode(data, started)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # missing or unusable cache: parse the database and write a fresh one
    db = parse_database(path)
    with contextlib.suppress(OSError):  # a read-only cache dir only costs speed
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_encode(db, fp), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, target)
    db.load_seconds = time.perf_counter() - started
    return db


_SHARED: dict[Path, tuple[str, OsvDatabase]] = {}
_SHARED_LOCK = threading.Lock()


def load_shared(path: Path, *, cache_dir: Path | None = None) -> OsvDatabase:
    """One loaded database per path per process, reloaded only when its files change."""
    key = path.resolve()
    with _SHARED_LOCK:
        fp = fingerprint(key) if key.exists() else ""
        hit = _SHARED.get(key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        db = load(key, cache_dir=cache_dir)
        _SHARED[key] = (fp, db)
        return db


def clear_shared() -> None:
    with _SHARED_LOCK:
        _SHARED.clear()
