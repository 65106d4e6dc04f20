"""``shipyard scan`` / ``shipyard vulndb`` as a user runs them: output, exit codes 0/1/2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.build.base import Artifact
from shipyard.cli.security import security_app
from shipyard.domain.manifest import parse_manifest
from shipyard.errors import SecurityScanFailed
from shipyard.security.gate import SecurityGate

from .conftest import WriteDb, advisory, artifact_tree


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, session_data_dir: Path) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that table cells are not folded
    monkeypatch.delenv("SHIPYARD_OSV_DB", raising=False)
    # The session's data dir: its parsed-database cache spares each test a cold parse.
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(session_data_dir))


runner = CliRunner()


def requirements(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return path


def test_scan_blocks_a_critical_vulnerability(tmp_path: Path, pypa_db_path: Path) -> None:
    req = requirements(tmp_path, "langchain==0.0.170\nrequests==2.32.3\nflask>=2\n")
    result = runner.invoke(security_app, ["scan", str(req), "--db", str(pypa_db_path)])
    assert result.exit_code == 1, result.output
    assert "PYSEC-2023-151" in result.output
    assert "CVE-2023-36281" in result.output  # its alias
    assert "critical 9.8" in result.output
    assert "0.0.171" in result.output  # the fixed version
    assert "BLOCK" in result.output
    assert "flask: not pinned with == (>=2)" in result.output
    assert "BLOCKED" in result.output


def test_scan_json_output(tmp_path: Path, pypa_db_path: Path) -> None:
    req = requirements(tmp_path, "urllib3==2.0.5\n")
    result = runner.invoke(
        security_app, ["scan", str(req), "--db", str(pypa_db_path), "--format", "json"]
    )
    assert result.exit_code == 0, result.output  # high is reported, not blocking by default
    data = json.loads(result.output)
    assert data["blocked"] is False
    assert data["packages"] == 1
    ids = {f["advisory_id"]: f for f in data["findings"]}
    assert ids["PYSEC-2023-192"]["severity"] == "high"
    assert ids["PYSEC-2023-192"]["fixed_versions"] == ["2.0.6"]
    assert "CVE-2023-43804" in ids["PYSEC-2023-192"]["aliases"]


def test_scan_clean_artifact_directory(tmp_path: Path, pypa_db_path: Path) -> None:
    root = artifact_tree(tmp_path / "artifact", {"requests": "2.32.3"})
    result = runner.invoke(security_app, ["scan", str(root), "--db", str(pypa_db_path)])
    assert result.exit_code == 0, result.output
    assert "Scanned 1 package(s)" in result.output
    assert "No known vulnerabilities." in result.output


def test_scan_with_policy_file(tmp_path: Path, pypa_db_path: Path) -> None:
    req = requirements(tmp_path, "urllib3==2.0.5\ngdal==3.0.1\n")
    policy = tmp_path / "shipyard.toml"
    policy.write_text(
        '[security]\nblock = ["critical", "high"]\n[[security.allow]]\nid = "CVE-2019-17545"\n'
        'reason = "no untrusted rasters"\nexpires = 2999-01-01\n'
    )
    result = runner.invoke(
        security_app, ["scan", str(req), "--db", str(pypa_db_path), "--policy", str(policy)]
    )
    assert result.exit_code == 1  # urllib3's high now blocks; gdal's critical is allowed
    assert "allowed: no untrusted rasters" in result.output
    assert "PYSEC-2023-192" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["scan", "{tmp}/nope"], "no such file or directory", id="missing-path"),
        pytest.param(["scan", "{req}", "--db", "{tmp}/no-db"], "does not exist", id="missing-db"),
        pytest.param(
            ["scan", "{req}", "--db", "{db}", "--policy", "{tmp}/bad.toml"],
            "block.0",
            id="bad-policy",
        ),
        pytest.param(["vulndb", "--db", "{tmp}/no-db"], "does not exist", id="vulndb-missing-db"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, pypa_db_path: Path, args: list[str], message: str
) -> None:
    req = requirements(tmp_path, "requests==2.32.3\n")
    (tmp_path / "bad.toml").write_text('block = ["severe"]\n')
    argv = [a.format(tmp=tmp_path, req=req, db=pypa_db_path) for a in args]
    result = runner.invoke(security_app, argv)
    assert result.exit_code == 2
    assert message in result.output


def test_no_database_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHIPYARD_DATA_DIR")
    req = requirements(tmp_path, "requests==2.32.3\n")
    result = runner.invoke(security_app, ["scan", str(req)])
    assert result.exit_code == 2
    assert "no vulnerability database: pass --db DIR, set SHIPYARD_OSV_DB" in result.output


def test_database_from_environment_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_db: WriteDb
) -> None:
    root = write_db(advisory("X-1", "requests", versions=["2.32.3"]))
    req = requirements(tmp_path, "requests==2.32.3\n")
    monkeypatch.setenv("SHIPYARD_OSV_DB", str(root))
    assert "X-1" in runner.invoke(security_app, ["scan", str(req)]).output
    monkeypatch.delenv("SHIPYARD_OSV_DB")
    data = tmp_path / "data"
    data.mkdir()
    root.rename(data / "osv")
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(data))
    assert "X-1" in runner.invoke(security_app, ["scan", str(req)]).output


def test_vulndb_reports_what_is_loaded(
    write_db: WriteDb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path / "data"))
    root = write_db(
        advisory("A-1", "pkg", versions=["1.0"]),
        advisory("W-1", "pkg", versions=["1.0"], withdrawn="2024-01-01T00:00:00Z"),
        raw={"broken.yaml": "id: [\n"},
    )
    result = runner.invoke(security_app, ["vulndb", "--db", str(root)])
    assert result.exit_code == 0, result.output
    lines = {" ".join(line.strip("│ ").split()) for line in result.output.splitlines()}
    assert any(line.startswith("advisories loaded │ 1") for line in lines), result.output
    assert any(line.startswith("withdrawn (ignored) │ 1") for line in lines)
    assert any(line.startswith("skipped / corrupt files │ 1") for line in lines)
    assert f"skipped {root}/broken.yaml: not valid YAML" in result.output
    data = json.loads(
        runner.invoke(security_app, ["vulndb", "--db", str(root), "--format", "json"]).output
    )
    assert (data["advisories"], data["withdrawn"], data["packages"]) == (1, 1, 1)
    assert data["from_cache"] is True  # second run: the parsed cache in the data dir
    assert data["problems"][0]["path"] == f"{root}/broken.yaml"


def test_vulndb_on_the_pypa_database(pypa_db_path: Path) -> None:
    result = runner.invoke(security_app, ["vulndb", "--db", str(pypa_db_path), "--format", "json"])
    data = json.loads(result.output)
    assert data["advisories"] > 2600
    assert data["withdrawn"] == 10
    assert data["problems"] == []
    assert data["ecosystems"] == {"PyPI": data["packages"]}


def test_scan_shows_non_blocking_findings_and_why(tmp_path: Path, pypa_db_path: Path) -> None:
    req = requirements(tmp_path, "urllib3==2.0.5\n")
    result = runner.invoke(security_app, ["scan", str(req), "--db", str(pypa_db_path)])
    assert result.exit_code == 0, result.output  # high: reported, not blocking by default
    assert "PYSEC-2023-192" in result.output
    assert "does not block: high is below the blocking threshold (policy blocks critical)" in (
        result.output
    )
    assert "Policy: built-in default: blocks critical" in result.output
    assert "passes" in result.output


def test_requirements_scan_says_it_saw_direct_pins_only(tmp_path: Path, pypa_db_path: Path) -> None:
    req = requirements(tmp_path, "flask>=2\nrequests==2.32.3\n")
    result = runner.invoke(security_app, ["scan", str(req), "--db", str(pypa_db_path)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the note wraps at the terminal width
    assert "(requirements, direct pins only)" in text
    assert f"Only the pinned direct dependencies of {req} were scanned" in text
    assert "pip install --dry-run --ignore-installed --report report.json -r FILE" in text
    data = json.loads(
        runner.invoke(
            security_app, ["scan", str(req), "--db", str(pypa_db_path), "--format", "json"]
        ).output
    )
    assert data["resolved"] is False
    assert "shipyard scan report.json" in data["note"]


def test_pip_report_scans_transitive_dependencies(tmp_path: Path, pypa_db_path: Path) -> None:
    # What `pip install --dry-run --ignore-installed --report` answers for `flask==2.2.2`:
    # werkzeug is only a dependency, and its version has advisories.
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "version": "1",
                "install": [
                    {"metadata": {"name": "Flask", "version": "2.2.2"}, "requested": True},
                    {"metadata": {"name": "Werkzeug", "version": "2.2.2"}, "requested": False},
                ],
            }
        )
    )
    result = runner.invoke(
        security_app, ["scan", str(report), "--db", str(pypa_db_path), "--format", "json"]
    )
    data = json.loads(result.output)
    assert (data["kind"], data["resolved"], data["note"]) == ("pip-report", True, None)
    assert "werkzeug" in {f["package"] for f in data["findings"]}
    assert all(f["status"] in ("block", "report") and f["why"] for f in data["findings"])
    assert result.exit_code == (1 if data["blocked"] else 0)


def test_shipyard_toml_beside_the_artifact_is_the_policy(
    tmp_path: Path, pypa_db_path: Path
) -> None:
    root = artifact_tree(tmp_path / "artifact", {"urllib3": "2.0.5"})
    (root / "shipyard.toml").write_text(
        '[service]\nname = "hello"\n[security]\nblock = ["critical", "high"]\n'
    )
    result = runner.invoke(security_app, ["scan", str(root), "--db", str(pypa_db_path)])
    assert result.exit_code == 1, result.output
    assert f"Policy: {root / 'shipyard.toml'} [security]: blocks high, critical" in (
        " ".join(result.output.split())
    )
    assert "BLOCKS: high is a blocking severity (policy blocks high, critical)" in result.output


MANIFEST_TEXT = (
    '[service]\nname = "hello"\n[build]\ncommand = "pip install -r requirements.txt -t deps"\n'
    '[run]\ncommand = "python app.py"\n'
)


@pytest.mark.parametrize(
    "security",
    [
        pytest.param("", id="default-policy"),
        pytest.param('[security]\nblock = ["critical", "high"]\n', id="block-high"),
        pytest.param("[security]\nblock = []\n", id="block-nothing"),
        pytest.param(
            '[security]\nblock = ["critical"]\n[[security.allow]]\nid = "CVE-2023-36281"\n'
            'reason = "reviewed"\nexpires = 2999-01-01\n',
            id="allow-entry",
        ),
    ],
)
async def test_scan_and_the_deploy_gate_block_the_same_findings(
    tmp_path: Path, pypa_db_path: Path, osv_cache_dir: Path, security: str
) -> None:
    # langchain 0.0.170: critical advisories; urllib3 2.0.5: high; requests 2.32.3: clean.
    root = artifact_tree(
        tmp_path / "artifact",
        {"langchain": "0.0.170", "urllib3": "2.0.5", "requests": "2.32.3"},
    )
    (root / "shipyard.toml").write_text(MANIFEST_TEXT + security)
    artifact = Artifact(
        digest="sha256:" + "ab" * 32,
        kind="directory",
        location=str(root),
        commit="c0ffee" * 6 + "c0ff",
        manifest=parse_manifest(MANIFEST_TEXT + security),
        builder="local",
        duration_ms=1,
    )
    gate = SecurityGate(data_dir=tmp_path / "data", db_path=pypa_db_path, cache_dir=osv_cache_dir)
    try:
        report = await gate.check(artifact, tmp_path / "sboms")
    except SecurityScanFailed as exc:
        gate_blocking = {f["advisory_id"] for f in exc.detail["findings"]}
        gate_other = set(exc.detail["allowed"]) | set(exc.detail["reported"])
    else:
        gate_blocking = set()
        gate_other = {f.advisory_id for f in report.evaluation.passed} | {
            a.finding.advisory_id for a in report.evaluation.allowed
        }
    result = runner.invoke(
        security_app, ["scan", str(root), "--db", str(pypa_db_path), "--format", "json"]
    )
    data = json.loads(result.output)
    scan_blocking = {f["advisory_id"] for f in data["findings"] if f["status"] == "block"}
    scan_other = {f["advisory_id"] for f in data["findings"] if f["status"] != "block"}
    assert gate_other, "the artifact must have non-blocking findings under every policy here"
    assert (scan_blocking, scan_other) == (gate_blocking, gate_other)
    assert result.exit_code == (1 if gate_blocking else 0)
