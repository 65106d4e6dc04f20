"""Security gate benchmark: loading the whole PyPA advisory database (cold parse, cache write,
warm load from the JSON cache) and scanning a 200-package environment (inventory, scan, SBOM,
and the whole gate check including signing).

The environment is synthetic but real-named: 200 PyPI packages taken from the database itself,
half pinned at a version an advisory lists as affected, half at their highest fixed version,
written to disk as ``*.dist-info/METADATA`` so the inventory walk is measured too.
``python bench/run.py scan``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from packaging.version import Version

from shipyard.build.base import Artifact
from shipyard.domain.manifest import parse_manifest
from shipyard.security import inventory, osv, sbom, versions
from shipyard.security.gate import SecurityGate
from shipyard.security.policy import parse_policy
from shipyard.security.scanning import OsvScanner

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def database_path() -> Path:
    for candidate in (
        os.environ.get("SHIPYARD_OSV_DB"),
        str(ROOT.parent / "shared" / "data" / "pypa-advisory-db"),
        "/work/shared/data/pypa-advisory-db",
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise FileNotFoundError("PyPA advisory database not found; set SHIPYARD_OSV_DB")


def timed(fn: Callable[[], T], runs: int) -> tuple[list[float], T]:
    samples: list[float] = []
    result: Any = None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t)
    return samples, result


def fmt(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    if len(ms) == 1:
        return f"{ms[0]:.0f} ms"
    return f"{statistics.median(ms):.0f} ms (min {min(ms):.0f}, max {max(ms):.0f}, n={len(ms)})"


def environment_from(db: osv.OsvDatabase, size: int = 200) -> dict[str, str]:
    """``size`` real package names with versions: even ones affected, odd ones at a fix."""
    listed: dict[str, set[str]] = {}
    fixed: dict[str, set[str]] = {}
    for adv in db.advisories:
        for aff in adv.affected:
            if aff.ecosystem != "PyPI":
                continue
            listed.setdefault(aff.name, set()).update(
                v for v in aff.versions if versions.parse_pypi(v) is not None
            )
            for rng in aff.ranges:
                fixed.setdefault(aff.name, set()).update(
                    e.version
                    for e in rng.events
                    if e.kind == "fixed" and versions.parse_pypi(e.version)
                )
    env: dict[str, str] = {}
    for name in sorted(listed):
        if len(env) == size:
            break
        if not listed[name]:
            continue
        pick_fixed = len(env) % 2 == 1 and fixed.get(name)
        pool = fixed[name] if pick_fixed else listed[name]
        env[name] = max(pool, key=_pep440)
    return env


def _pep440(version: str) -> Version:
    parsed = versions.parse_pypi(version)
    assert parsed is not None  # pools hold parseable versions only
    return parsed


def write_tree(root: Path, env: dict[str, str]) -> None:
    site = root / "deps"
    for name, version in env.items():
        d = site / f"{name.replace('-', '_')}-{version}.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (root / "app.py").write_text("print('hello')\n")


def main() -> str:
    db_path = database_path()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp_s:
        tmp = Path(tmp_s)
        cold, db = timed(lambda: osv.parse_database(db_path), 3)
        stats = db.stats()
        del db  # the server holds one database, not four
        gc.collect()
        cache = tmp / "cache"
        write, _ = timed(lambda: osv.load(db_path, cache_dir=cache), 1)
        warm, warm_db = timed(lambda: osv.load(db_path, cache_dir=cache), 5)
        if not warm_db.from_cache or len(warm_db.advisories) != stats.advisories:
            raise RuntimeError("warm load did not come from the cache")
        fp, _ = timed(lambda: osv.fingerprint(db_path), 5)
        cache_bytes = osv.cache_file(db_path, cache).stat().st_size

        env = environment_from(warm_db)
        tree = tmp / "artifact"
        write_tree(tree, env)
        inv_t, inv = timed(lambda: inventory.from_tree(tree), 5)
        scanner = OsvScanner(warm_db)
        scan_t, result = timed(lambda: scanner.scan(inv), 5)
        subject = sbom.SbomSubject(digest="sha256:" + "0" * 64, name="bench")
        sbom_t, _ = timed(lambda: sbom.to_json(sbom.build_bom(inv, subject)), 5)

        artifact = Artifact(
            digest="sha256:" + "0" * 64,
            kind="directory",
            location=str(tree),
            commit="0" * 40,
            manifest=parse_manifest(
                '[service]\nname = "bench"\n[run]\ncommand = "python app.py"\n'
            ),
            builder="local",
            duration_ms=0,
        )
        gate = SecurityGate(
            data_dir=tmp / "data",
            db_path=db_path,
            policy=parse_policy({"block": []}),  # report only, so every run goes on to sign
            cache_dir=cache,
        )
        gate.scanner()  # database loaded once per process, as in the server
        reports = [asyncio.run(gate.check(artifact, tmp / "sboms")) for _ in range(5)]
        osv.clear_shared()

    sev: dict[str, int] = {}
    for f in result.findings:
        sev[f.severity.value] = sev.get(f.severity.value, 0) + 1
    gate_ms = {
        k: statistics.median(r.durations_ms[k] for r in reports) for k in reports[0].durations_ms
    }
    lines += [
        "## Security scan",
        "",
        f"Database: the PyPA advisory database snapshot ({stats.files} files, {stats.advisories} "
        f"advisories, {stats.packages} packages, {stats.withdrawn} withdrawn), YAML parsed with "
        f"{'libyaml (CSafeLoader)' if hasattr(yaml, 'CSafeLoader') else 'pure-Python PyYAML'}.",
        "",
        "| step | time |",
        "| --- | --- |",
        f"| cold load: parse every file | {fmt(cold)} |",
        f"| first load with a cache dir: parse + write the JSON cache ({cache_bytes / 1e6:.1f} MB) "
        f"| {fmt(write)} |",
        f"| warm load from the cache (fingerprint included) | {fmt(warm)} |",
        f"| fingerprint alone (stat of every file) | {fmt(fp)} |",
        "",
        f"Environment: {len(inv.packages)} real PyPI package names from the database, synthetic "
        "pins (every other one at a version an advisory lists as affected, the others at their "
        "highest fixed version), written as `*.dist-info/METADATA` files. "
        f"Result: {len(result.findings)} findings in {result.vulnerable_packages} packages "
        f"({', '.join(f'{n} {s}' for s, n in sorted(sev.items()))}).",
        "",
        "| step (200 packages) | time |",
        "| --- | --- |",
        f"| inventory (walk + METADATA headers) | {fmt(inv_t)} |",
        f"| scan (database already loaded) | {fmt(scan_t)} |",
        f"| CycloneDX SBOM build + JSON | {fmt(sbom_t)} |",
        "| whole gate check, median of 5: "
        + ", ".join(f"{k} {v:.0f}" for k, v in gate_ms.items() if k != "total")
        + f" | {gate_ms['total']:.0f} ms |",
        "",
        "The first scan after a cold start pays the warm load (or the cold parse when no cache "
        "exists); later scans in the same process reuse the loaded database.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
