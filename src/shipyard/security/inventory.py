"""What an artifact contains: the packages the scanner checks and the SBOM lists.

Four sources, one result (``Inventory``):

* a directory tree (a built artifact, a ``pip install --target`` dir, a venv, an image's files
  as ``rootfs.py`` extracts them): every ``*.dist-info/METADATA`` and ``*.egg-info/PKG-INFO``
  under it, plus the OS packages at its root: dpkg's ``var/lib/dpkg/status`` (and distroless
  ``var/lib/dpkg/status.d/*``) and apk's ``lib/apk/db/installed``, named after the distribution
  ``etc/os-release`` states (Debian, Ubuntu, Alpine);
* a Python environment: a venv's site-packages, or the running interpreter's ``sys.path``;
* a requirements or lock file: ``name==version`` pins (``-r`` includes followed), ``poetry.lock``
  / ``uv.lock`` (``[[package]]``) and ``Pipfile.lock``. Lines without an exact pin are reported in
  ``Inventory.skipped`` with the reason, never silently dropped;
* a pip installation report (``pip install --dry-run --ignore-installed --report FILE``): the
  resolved set, transitive dependencies included.

``Inventory.resolved`` says whether the result is a whole environment (a tree, a venv, a lock file,
a pip report) or only what a requirements file pins, which lists transitive dependencies only if
whoever wrote it put them there (``pip freeze`` / ``pip-compile`` output does).

Called by the gate (``gate.py``) on the built artifact and by ``shipyard scan``. Python names are
normalized per PEP 503 so they match the advisory database's index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from shipyard.errors import InvalidInput

PYPI = "PyPI"
DEBIAN = "Debian"
UBUNTU_ECOSYSTEM = "Ubuntu"
ALPINE = "Alpine"
UBUNTU = "ubuntu"
#: OS ecosystems: their advisories name source packages (``Package.source_name``).
OS_ECOSYSTEMS = frozenset({DEBIAN, UBUNTU_ECOSYSTEM, ALPINE})

_PEP503 = re.compile(r"[-_.]+")
#: Directories never worth descending into when looking for installed distributions.
_PRUNE = frozenset({".git", ".hg", ".svn", "__pycache__", "node_modules", ".mypy_cache"})
_LOCK_TOML = ("poetry.lock", "uv.lock", "pdm.lock")
MAX_METADATA_BYTES = 4 * 1024 * 1024
#: requirements-file options that change where pip looks, not what it installs.
_PIP_GLOBAL_OPTIONS = (
    "--hash",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--trusted-host",
    "--no-binary",
    "--only-binary",
    "--pre",
    "--prefer-binary",
    "--require-hashes",
    "--no-index",
    "-c",
    "--constraint",
)


def normalize_name(name: str) -> str:
    """PEP 503: ``Foo.Bar_baz`` -> ``foo-bar-baz``."""
    return _PEP503.sub("-", name).lower()


@dataclass(frozen=True)
class Package:
    ecosystem: str  # "PyPI", "Debian", "Ubuntu" or "Alpine" (OSV ecosystem names)
    name: str  # PEP 503-normalized for PyPI, as dpkg / apk write it for OS packages
    version: str
    #: Where it was found: a METADATA path, the dpkg status file, ``requirements.txt:12``.
    location: str = ""
    #: OS packages: the source package (dpkg ``Source``, apk ``o:`` origin); OSV's OS
    #: advisories are keyed by source package.
    source_name: str | None = None
    source_version: str | None = None
    #: OS packages: os-release ``VERSION_ID`` (``12``, ``3.19.1``), matched against the
    #: advisory's release (``Debian:12``, ``Alpine:v3.19``).
    release: str | None = None
    arch: str | None = None
    #: OS packages: the distribution (os-release ``ID``), the package URL's namespace.
    distro: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.ecosystem, self.name, self.version)


@dataclass(frozen=True)
class Skipped:
    source: str  # file (and line) that could not be used
    reason: str


@dataclass(frozen=True)
class Inventory:
    """The packages of one scanned thing; ``skipped`` says what could not be read and why."""

    source: str
    kind: str  # "tree", "environment", "requirements"
    packages: tuple[Package, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    #: True: everything installed (or a resolver's full answer); False: a requirements file's
    #: pins, where dependencies of dependencies appear only if the file lists them.
    resolved: bool = True

    def by_ecosystem(self, ecosystem: str) -> list[Package]:
        return [p for p in self.packages if p.ecosystem == ecosystem]


@dataclass
class _Collector:
    packages: dict[tuple[str, str, str], Package] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def add(self, pkg: Package) -> None:
        # One entry per (ecosystem, name, version): the same dist vendored twice is one package.
        self.packages.setdefault(pkg.key, pkg)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append(Skipped(source, reason))

    def result(self, source: str, kind: str, *, resolved: bool = True) -> Inventory:
        pkgs = sorted(self.packages.values(), key=lambda p: (p.ecosystem, p.name, p.version))
        return Inventory(source, kind, tuple(pkgs), tuple(self.skipped), resolved)


# --- Python distributions -------------------------------------------------------------------------


def _metadata_file(entry: Path) -> Path | None:
    """The metadata file of a ``*.dist-info`` / ``*.egg-info`` entry (a PKG-INFO-style file for
    old single-file egg-info installs)."""
    if entry.name.endswith(".dist-info"):
        return entry / "METADATA"
    if entry.name.endswith(".egg-info"):
        return entry / "PKG-INFO" if entry.is_dir() else entry
    return None


def _read_distribution(meta: Path, out: _Collector) -> None:
    try:
        if meta.stat().st_size > MAX_METADATA_BYTES:
            out.skip(str(meta), f"metadata larger than {MAX_METADATA_BYTES} bytes")
            return
        # Only the headers matter; the body (long description) is never parsed.
        with meta.open(encoding="utf-8", errors="replace") as fh:
            headers = HeaderParser().parse(fh, headersonly=True)
    except FileNotFoundError:
        out.skip(str(meta.parent), "no METADATA/PKG-INFO file in the distribution directory")
        return
    except OSError as exc:
        out.skip(str(meta), f"unreadable: {exc.strerror or exc}")
        return
    name, version = headers.get("Name"), headers.get("Version")
    if not name or not version:
        out.skip(str(meta), "metadata has no Name or Version header")
        return
    out.add(Package(PYPI, normalize_name(str(name).strip()), str(version).strip(), str(meta)))


def _scan_site_dir(directory: Path, out: _Collector) -> None:
    """Distributions installed directly in one site-packages-like directory (not recursive)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        meta = _metadata_file(entry)
        if meta is not None:
            _read_distribution(meta, out)


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    # Symlinked directories are not followed: a venv's lib64 -> lib would list everything twice
    # and a link out of the tree would scan what the artifact does not contain.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _PRUNE)
        yield Path(dirpath), dirnames, filenames


def _scan_tree_python(root: Path, out: _Collector) -> None:
    for dirpath, dirnames, filenames in _walk(root):
        for d in list(dirnames):
            if d.endswith((".dist-info", ".egg-info")):
                _read_distribution(
                    dirpath / d / ("METADATA" if d.endswith(".dist-info") else "PKG-INFO"), out
                )
                dirnames.remove(d)  # nothing below a metadata directory is a distribution
        for f in filenames:
            if f.endswith(".egg-info"):
                _read_distribution(dirpath / f, out)


# --- Debian packages ------------------------------------------------------------------------------


def _parse_control_paragraphs(text: str) -> Iterator[dict[str, str]]:
    """RFC 822-style paragraphs of a dpkg status file; continuation lines are folded in."""
    para: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if para:
                yield para
            para, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                para[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip()
            para[last] = value.strip()
    if para:
        yield para


def os_release(root: Path) -> dict[str, str]:
    """The tree's ``etc/os-release`` (else ``usr/lib/os-release``, as os-release(5) says), as a
    mapping; empty when neither is a regular file. Symlinks are not followed: in an artifact
    or an image, a link could point anywhere on this machine."""
    for candidate in (root / "etc" / "os-release", root / "usr" / "lib" / "os-release"):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(64 * 1024).decode("utf-8", errors="replace")
        return {
            k.strip(): v.strip().strip("\"'")
            for k, _, v in (line.partition("=") for line in text.splitlines())
            if k.strip() and not k.startswith("#")
        }
    return {}


@dataclass(frozen=True)
class Distro:
    """Which OS the tree is (from os-release), as package URLs and OSV name it."""

    #: The purl namespace: os-release ``ID`` (``debian``, ``ubuntu``, ``alpine``), else None.
    id: str | None
    #: os-release ``VERSION_ID`` (``12``, ``22.04``, ``3.19.1``), else None.
    version: str | None


def _distro(root: Path) -> Distro:
    fields = os_release(root)
    distro_id = fields.get("ID", "").lower() or None
    if distro_id is not None and not re.fullmatch(r"[a-z0-9._-]{1,64}", distro_id):
        distro_id = None  # os-release says IDs are lowercase [a-z0-9._-]; anything else is noise
    return Distro(distro_id, fields.get("VERSION_ID") or None)


#: Distributions whose packages are apk's (os-release IDs); any other ID is taken for dpkg's.
APK_DISTROS = frozenset({"alpine", "wolfi", "chainguard", "postmarketos"})


def _dpkg_naming(distro: Distro) -> tuple[str, str, str | None]:
    """(OSV ecosystem, purl namespace, release) of a dpkg database: Ubuntu's own, else
    Debian's (derivatives share Debian's packages; their release numbers do not)."""
    if distro.id == UBUNTU:
        return UBUNTU_ECOSYSTEM, UBUNTU, distro.version
    if distro.id is None or distro.id in APK_DISTROS:
        return DEBIAN, "debian", None
    return DEBIAN, distro.id, distro.version if distro.id == "debian" else None


def _apk_naming(distro: Distro) -> tuple[str, str | None]:
    """(purl namespace, release) of an apk database; the OSV ecosystem is Alpine's."""
    if distro.id in APK_DISTROS:
        return distro.id, distro.version if distro.id == "alpine" else None
    return "alpine", None


def _scan_dpkg(root: Path, out: _Collector, distro: Distro) -> None:
    status_files: list[Path] = []
    status = root / "var" / "lib" / "dpkg" / "status"
    if status.is_file():
        status_files.append(status)
    status_d = root / "var" / "lib" / "dpkg" / "status.d"
    if status_d.is_dir():
        status_files.extend(
            sorted(p for p in status_d.iterdir() if p.is_file() and "." not in p.name)
        )
    ecosystem, namespace, release = _dpkg_naming(distro)
    for path in status_files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            out.skip(str(path), f"unreadable: {exc.strerror or exc}")
            continue
        for package in parse_dpkg_status(text, str(path), out):
            out.add(
                dataclasses.replace(package, ecosystem=ecosystem, release=release, distro=namespace)
            )


def parse_dpkg_status(text: str, location: str, out: _Collector | None = None) -> list[Package]:
    """The installed packages of a dpkg status file (``Status: ... installed`` or no Status,
    as distroless ``status.d`` entries may have). Paragraphs without Package or Version are
    reported to ``out``; removed, config-files-only or half-installed packages are left out
    (their code is not on disk)."""
    found: list[Package] = []
    for para in _parse_control_paragraphs(text):
        name, version = para.get("Package"), para.get("Version")
        if not name or not version:
            if out is not None:
                out.skip(location, f"dpkg paragraph {name or '?'} without Package or Version")
            continue
        state = para.get("Status", "install ok installed").split()
        if state[-1:] != ["installed"]:
            continue
        src_name, src_version = name, version
        if src := para.get("Source"):
            # "Source: glibc (2.36-9+deb12u4)": the source version only when it differs.
            m = re.fullmatch(r"(\S+)(?:\s+\((\S+)\))?", src)
            if m:
                src_name, src_version = m[1], m[2] or version
        found.append(
            Package(
                DEBIAN,
                name,
                version,
                location,
                source_name=src_name,
                source_version=src_version,
                arch=para.get("Architecture"),
            )
        )
    return found


# --- Alpine packages ------------------------------------------------------------------------------


def parse_apk_installed(text: str, location: str, out: _Collector | None = None) -> list[Package]:
    """The packages of an apk database (``lib/apk/db/installed``): one paragraph per package,
    ``P:`` name, ``V:`` version, ``A:`` architecture, ``o:`` origin (the aports source package,
    what Alpine's advisories name). A paragraph without P or V is reported to ``out``."""
    found: list[Package] = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and len(key) == 1 and key not in fields:
                fields[key] = value.strip()
        if not fields:
            continue
        name, version = fields.get("P"), fields.get("V")
        if not name or not version:
            if out is not None:
                out.skip(location, f"apk entry {name or '?'} without P: (name) or V: (version)")
            continue
        found.append(
            Package(
                ALPINE,
                name,
                version,
                location,
                source_name=fields.get("o") or name,
                source_version=version,
                arch=fields.get("A") or None,
            )
        )
    return found


def _scan_apk(root: Path, out: _Collector, distro: Distro) -> None:
    installed = root / "lib" / "apk" / "db" / "installed"
    if not installed.is_file():
        return
    try:
        text = installed.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        out.skip(str(installed), f"unreadable: {exc.strerror or exc}")
        return
    namespace, release = _apk_naming(distro)
    for package in parse_apk_installed(text, str(installed), out):
        out.add(dataclasses.replace(package, release=release, distro=namespace))


# --- entry points ---------------------------------------------------------------------------------


def from_tree(root: Path) -> Inventory:
    """Every Python distribution under ``root``, and the OS packages of its dpkg database and
    its apk database, named after the distribution its os-release states."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a directory")
    out = _Collector()
    _scan_tree_python(root, out)
    distro = _distro(root)
    _scan_dpkg(root, out, distro)
    _scan_apk(root, out, distro)
    return out.result(str(root), "tree")


def site_dirs(env: Path) -> list[Path]:
    """The site-packages directories of a virtual environment or Python installation prefix."""
    found = sorted(env.glob("lib/python*/site-packages")) + sorted(
        env.glob("lib/python*/dist-packages")
    )
    found += [p for p in (env / "Lib" / "site-packages",) if p.is_dir()]
    return [p for p in found if p.is_dir()]


def from_environment(env: Path | None = None) -> Inventory:
    """A venv (its site-packages) or, with None, what the running interpreter sees on sys.path."""
    out = _Collector()
    if env is None:
        for entry in sys.path:
            path = Path(entry or ".")
            if path.is_dir():
                _scan_site_dir(path, out)
        return out.result("sys.path", "environment")
    dirs = site_dirs(env)
    if not dirs:
        raise InvalidInput(
            f"{env}: no lib/python*/site-packages inside; pass a virtual environment's directory"
        )
    for d in dirs:
        _scan_site_dir(d, out)
    return out.result(str(env), "environment")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        # A comment starts at '#' at line start or after whitespace (pip's rule; URLs keep theirs).
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            yield start, buf.strip()
        buf = ""
    if buf.strip():
        yield start, buf.strip()


def _read_requirements(path: Path, out: _Collector, seen: set[Path]) -> None:
    real = path.resolve()
    if real in seen:
        return
    seen.add(real)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from exc
    for lineno, line in _logical_lines(text):
        where = f"{path}:{lineno}"
        if line.startswith(("-r ", "--requirement ", "-r", "--requirement=")):
            target = re.sub(r"^(-r|--requirement)[= ]?\s*", "", line).strip()
            include = path.parent / target
            if include.is_file():
                _read_requirements(include, out, seen)
            else:
                out.skip(where, f"included file {target} not found")
            continue
        if line.startswith(("-e ", "--editable")):
            out.skip(where, "editable install: no released version to check")
            continue
        if line.startswith("-"):
            if not line.startswith(_PIP_GLOBAL_OPTIONS):
                out.skip(where, f"option line not understood: {line.split()[0]}")
            continue
        # Per-requirement options ("--hash=sha256:...") follow the requirement itself.
        spec = re.split(r"\s+--?[a-z]", line, maxsplit=1)[0].strip()
        try:
            req = Requirement(spec)
        except InvalidRequirement as exc:
            out.skip(where, f"not a requirement: {exc}")
            continue
        if req.url:
            out.skip(where, f"{req.name}: direct reference ({req.url}), no version to check")
            continue
        pins = [
            s for s in req.specifier if s.operator in ("==", "===") and not s.version.endswith(".*")
        ]
        if len(pins) != 1 or len(req.specifier) != 1:
            why = (
                "no version specifier"
                if not req.specifier
                else f"not pinned with == ({req.specifier})"
            )
            out.skip(where, f"{req.name}: {why}")
            continue
        out.add(Package(PYPI, normalize_name(req.name), pins[0].version, where))


def _read_toml_lock(path: Path, out: _Collector) -> None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"{path}: not a readable TOML lock file: {exc}") from exc
    entries = data.get("package", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"{path}: [[package]] must be an array of tables")
    for i, entry in enumerate(entries):
        where = f"{path}:package[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            out.skip(where, "entry without a name")
            continue
        version = entry.get("version")
        if not isinstance(version, str):
            out.skip(where, f"{entry['name']}: no version (source or virtual package)")
            continue
        source = entry.get("source")
        if isinstance(source, dict) and ("editable" in source or "virtual" in source):
            out.skip(where, f"{entry['name']}: local project, not a released distribution")
            continue
        out.add(Package(PYPI, normalize_name(entry["name"]), version, where))


def _read_pipfile_lock(path: Path, out: _Collector) -> None:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not a readable Pipfile.lock: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: Pipfile.lock must be a JSON object")
    for section in ("default", "develop"):
        for name, entry in (data.get(section) or {}).items():
            where = f"{path}:{section}.{name}"
            version = entry.get("version") if isinstance(entry, dict) else None
            if not isinstance(version, str) or not version.startswith("=="):
                out.skip(where, f"{name}: not pinned with ==")
                continue
            out.add(Package(PYPI, normalize_name(name), version[2:], where))


def _pip_report(path: Path) -> dict[str, Any] | None:
    """The parsed pip installation report at ``path``, or None if it is not one."""
    if path.suffix != ".json" or path.name == "Pipfile.lock":
        return None
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not a readable JSON file: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("install"), list):
        return data
    raise InvalidInput(
        f"{path}: a JSON file shipyard scan reads must be a pip installation report "
        "(pip install --dry-run --ignore-installed --report FILE -r requirements.txt)"
    )


def from_pip_report(path: Path, data: dict[str, Any]) -> Inventory:
    """Every distribution a pip installation report says it would install: the resolved set."""
    out = _Collector()
    for i, item in enumerate(data["install"]):
        where = f"{path}:install[{i}]"
        meta = item.get("metadata") if isinstance(item, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        version = meta.get("version") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not isinstance(version, str):
            out.skip(where, "entry without metadata name and version")
            continue
        if isinstance(item, dict) and isinstance(item.get("download_info"), dict):
            info = item["download_info"]
            if "dir_info" in info:
                out.skip(where, f"{name}: local directory, not a released distribution")
                continue
        out.add(Package(PYPI, normalize_name(name), version, where))
    return out.result(str(path), "pip-report")


def from_requirements(path: Path) -> Inventory:
    """Exact pins of a requirements file (or a poetry/uv/pdm/Pipfile lock, which are resolved)."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    out = _Collector()
    if path.name in _LOCK_TOML:
        _read_toml_lock(path, out)
        return out.result(str(path), "lock")
    if path.name == "Pipfile.lock":
        _read_pipfile_lock(path, out)
        return out.result(str(path), "lock")
    _read_requirements(path, out, set())
    return out.result(str(path), "requirements", resolved=False)


def from_path(path: Path) -> Inventory:
    """What ``shipyard scan PATH`` means: a directory (an artifact, a ``--target`` dir, a venv,
    an unpacked image) is read by ``from_tree``, exactly as the deploy gate reads an artifact; a
    ``.json`` file is a pip installation report; any other file a requirements/lock file."""
    if path.is_file():
        report = _pip_report(path)
        if report is not None:
            return from_pip_report(path, report)
        return from_requirements(path)
    if path.is_dir():
        return from_tree(path)
    raise InvalidInput(f"{path}: no such file or directory")


def merge(source: str, inventories: Iterable[Inventory]) -> Inventory:
    out = _Collector()
    for inv in inventories:
        for p in inv.packages:
            out.add(p)
        out.skipped.extend(inv.skipped)
    return out.result(source, "merged")
