"""Issue 16's check end to end: what real releases need around the switch, against one real
``shipyard serve`` (its agent, sandboxed replicas, a notification sink from ``serve --config``)
shared by the module's tests, each on a service of its own:

- a ``pre_deploy`` hook that runs a schema migration (the Flask ``notes`` app, test-local repo,
  ``tests/e2e/release.py``) runs once per deployment, in the candidate's sandbox, before the new
  revision's first replica starts -- each replica reports the migrations it saw when it started,
  and the migrations "database" (an HTTP server in the test) saw the migration before any of
  them; a failing migration ends the deployment ``Failed`` with the old revision serving every
  request under load;
- a secret set with ``shipyard secret set`` reaches the app (env and file) and nowhere else: not
  the data directory's files (database, logs, audit, SBOMs, attestations), API answers,
  ``shipyard status`` or the audit trail; a rollback restores the version the revision used;
- a webhook receiver gets signed, verifiable notifications for every state change, including
  the ones produced while it was down and across a ``kill -9`` of ``serve``;
- a deployment with ``[deploy] on_failure = "freeze"`` whose analysis fails stays ``Frozen``
  (weights unchanged, also after a ``serve`` restart) until ``shipyard promote --reason`` or
  ``shipyard abort --reason``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from shipyard.cli.demo import _git, commit_version
from shipyard.cli.token import issue_local
from shipyard.notify import signing
from shipyard.notify.events import event_of
from tests.e2e.release import (
    HttpLog,
    Request,
    files_holding,
    migrations_db,
    receiver,
    release_repo,
    signed,
)
from tests.e2e.support import ALL, Recorder, Server, wait_for_state, wait_until

REPLICAS = 2  # the notes example's [run] replicas
FAST_ANALYSIS = {"interval_seconds": 1, "min_requests": 20}
#: A canary stage's analysis that drives its own requests (nobody else visits the service).
SELF_LOADED = {"interval_seconds": 1, "min_requests": 5, "load": {"rps": 20}}
SINK = "e2e-receiver"
#: Every notification event a sink may filter on (the design's list).
EVENTS = {
    "deployment.started",
    "stage.done",
    "deployment.paused",
    "deployment.promoted",
    "deployment.rolled_back",
    "deployment.failed",
    "deployment.frozen",
    "deployment.succeeded",
    "drift.found",
    "audit.checkpoint",
}
MIGRATION = """
[hooks.pre_deploy]
command = ["python3", "migrate.py"]
timeout_seconds = 120
"""


@dataclass
class World:
    """The module's ``shipyard serve`` and what it talks to."""

    server: Server
    migrations: HttpLog
    receiver: HttpLog
    sink_secret: str

    def token(self, *extra: str) -> str:
        return issue_local(self.server.data_dir, "e2e-release", [*ALL, *extra], ttl_seconds=7200)

    def shipyard(
        self, *args: str, perms: tuple[str, ...] = (), stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``shipyard ARGS --server URL`` as a user runs it, with a token of ``ALL`` + ``perms``."""
        local = args[0] == "audit"  # reads the data directory, talks to no server
        server = () if local else ("--server", self.server.base)
        done = subprocess.run(
            [sys.executable, "-m", "shipyard.cli.main", *args, *server],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "SHIPYARD_TOKEN": self.token(*perms), "COLUMNS": "200"},
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"shipyard {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}"
            )
        return done

    def kill9_and_restart(self) -> None:
        """``kill -9`` of ``serve``, then a new one on the same data directory (its agent and
        the replicas keep running)."""
        self.server.kill9()
        self.server.start()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("release")
    migrations, sink = migrations_db(), receiver()
    sink_secret = "whsec_" + secrets.token_hex(24)
    config = root / "shipyard-server.toml"
    config.write_text(
        f"""
[notifications]
retry_cap_seconds = 5  # the backoff's cap: a receiver back up is retried within seconds

[[notifications.sinks]]
name = "{SINK}"
type = "webhook"
url = "{sink.url}/shipyard"
secret_env = "E2E_SINK_SECRET"
"""
    )
    server = Server(root / "data", "--config", str(config), env={"E2E_SINK_SECRET": sink_secret})
    server.start()
    try:
        yield World(server, migrations, sink, sink_secret)
    finally:
        server.stop()
        server.stop_agent()
        migrations.down()
        sink.down()


def blue_green(**params: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": 1,
            "scale_down_delay_seconds": 2,
            **params,
        }
    }


def canary(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"Canary": {"stages": list(stages), "scale_down_delay_seconds": 2}}


def head(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD")


def final(server: Server, dep_id: str, status: str, what: str) -> dict[str, Any]:
    doc = server.wait_final(dep_id, timeout=180)
    assert doc["status"] == status, f"{what}: {doc['status']}, error: {doc.get('error')}"
    return doc


def audit(server: Server, dep_id: str) -> list[dict[str, Any]]:
    assert server.client is not None
    r = server.client.get(f"/api/v1/deployments/{dep_id}/audit")
    assert r.status_code == 200, r.text
    return list(r.json()["records"])


def build_log(server: Server, dep_id: str) -> str:
    assert server.client is not None
    return str(server.client.get(f"/api/v1/deployments/{dep_id}/logs").json()["text"])


def stage(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in doc["stages"] if s["name"] == name]
    assert len(found) == 1, f"stage {name}: {[s['name'] for s in doc['stages']]}"
    return dict(found[0])


def revisions_running(server: Server, service: str) -> set[str]:
    return {r["revision"] for r in server.service(service)["replicas"]}


# --- hooks: a migration before the new revision starts -----------------------------------------


def migration_posts(
    world: World, kind: str, version: str, service: str = "migrating"
) -> list[Request]:
    """What ``service``'s migrations of ``version`` told the database (``attempts``/``applied``)."""
    return [
        r
        for r in world.migrations.snapshot()
        if r.method == "POST"
        and r.path == f"/{kind}"
        and (r.json()["version"], r.json()["service"]) == (version, service)
    ]


def start_reads(world: World, version: str, service: str = "migrating") -> list[Request]:
    """The replicas' reads of the migrations at start (release_app.py), of ``version``."""
    return [
        r
        for r in world.migrations.snapshot()
        if r.method == "GET" and f"version={version}&service={service}&" in r.path
    ]


def replicas_report(url: str) -> dict[str, dict[str, Any]]:
    """replica id -> ``/release/migrations`` of each replica behind ``url`` (the router takes
    turns; asked until every replica answered)."""
    seen: dict[str, dict[str, Any]] = {}

    def all_seen() -> bool:
        doc = httpx.get(f"{url}/release/migrations", timeout=10).json()
        seen[str(doc["replica"])] = doc
        return len(seen) >= REPLICAS

    wait_until(all_seen, 30, "every replica to answer /release/migrations")
    return seen


def check_migrated(
    world: World, dep: dict[str, Any], version: str, applied: list[str]
) -> dict[str, Any]:
    """``dep`` ran its migration once, in the sandbox, before its replicas started; returns the
    migration's report."""
    server, what = world.server, f"deployment of {version}"
    hook = stage(dep, "hook_pre_deploy")
    names = [s["name"] for s in dep["stages"]]
    assert names.index("hook_pre_deploy") < names.index("start"), f"{what}: {names}"
    assert hook["status"] == "succeeded", f"{what}: {hook}"
    assert hook["detail"].get("exit_code") == 0, f"{what}: {hook}"
    assert hook["detail"].get("duration_ms") is not None or hook["duration_ms"] is not None, hook
    # once per deployment: one attempt, one migration applied
    attempts = migration_posts(world, "attempts", version)
    done = migration_posts(world, "applied", version)
    assert len(attempts) == len(done) == 1, f"{what}: {len(attempts)} attempts, {len(done)} applied"
    ran: dict[str, Any] = done[0].json()
    assert ran["revision"] == dep["green_revision"], f"{what}: the hook saw {ran}"
    assert ran["port"] is None, f"{what}: a hook is no replica, it gets no PORT: {ran}"
    assert ran["uid"] != 0, f"{what}: the hook ran as root, not sandboxed: {ran}"
    # before the revision started: every replica read the migrations after the hook wrote one
    reads = start_reads(world, version)
    assert len(reads) >= REPLICAS, f"{what}: {len(reads)} replica starts read the migrations"
    assert all(r.at > done[0].at for r in reads), f"{what}: a replica started before the hook"
    reports = replicas_report(dep["result"]["url"])
    readers = {parse_qs(urlsplit(r.path).query)["replica"][0] for r in reads}
    assert set(reports) <= readers, f"{what}: replicas {sorted(reports)}, reads {sorted(readers)}"
    for replica, report in reports.items():
        assert report["applied_at_start"] == applied, f"{what}: replica {replica} saw {report}"
        assert report["uid"] == ran["uid"], f"{what}: the hook ran as {ran['uid']}, app {report}"
    # the hook's output is in the deployment's log, its result in the audit trail
    log = build_log(server, dep["id"])
    assert f"migrating the notes schema to {version}" in log, log[-2000:]
    assert "[hook pre_deploy]" in log, log[-2000:]
    records = [r for r in audit(server, dep["id"]) if r["event_type"] == "hook.succeeded"]
    assert len(records) == 1, f"{what}: {records}"
    assert records[0]["detail"]["point"] == "pre_deploy", records
    assert records[0]["detail"]["exit_code"] == 0, records
    assert "migrate.py" in json.dumps(records[0]["detail"]), records
    return ran


def gate_asks(world: World, dep_id: str) -> list[Request]:
    return [
        r for r in world.migrations.snapshot() if r.path == "/gate" and r.json().get("id") == dep_id
    ]


def check_gate_asked(world: World, dep: dict[str, Any]) -> None:
    """The deployment's ``confirm_promotion`` gate was asked once, before the switch to 100%,
    with the deployment's summary and its idempotency key; the answer is a stage."""
    asks = gate_asks(world, dep["id"])
    assert len(asks) == 1, f"gate asked {len(asks)} times"
    body = asks[0].json()
    assert body["gate"] == {"name": "change-board", "at": "confirm_promotion"}, body
    assert body["revision"] == dep["green_revision"], body
    assert asks[0].headers["idempotency-key"] == f"{dep['id']}:change-board", asks[0].headers
    assert asks[0].headers["user-agent"].startswith("shipyard/"), asks[0].headers
    st = stage(dep, "gate_change-board")
    assert st["status"] == "succeeded", st
    assert json.dumps(st).count(world.migrations.url) == 0, f"the gate's full URL is shown: {st}"
    passed = [r for r in audit(world.server, dep["id"]) if r["event_type"] == "gate.passed"]
    assert len(passed) == 1 and "/gate" not in json.dumps(passed), passed


def test_a_pre_deploy_migration_runs_once_before_its_revision_and_a_failing_one_changes_nothing(
    world: World, tmp_path: Path
) -> None:
    server, service = world.server, "migrating"
    # a change-management gate too: the migrations "database" answers its POST with a 201
    gate = f'[[gates]]\nname = "change-board"\nurl = "{world.migrations.url}/gate"\n'
    gate += 'at = "confirm_promotion"\n'
    repo = release_repo(
        tmp_path / "repo",
        service,
        env={"MIGRATIONS_URL": world.migrations.url},
        sections=MIGRATION + gate,
    )
    d1 = final(server, server.deploy_with(repo, head(repo), blue_green(), service), "Success", "v1")
    check_migrated(world, d1, "v1", ["v1"])
    check_gate_asked(world, d1)
    d2 = final(
        server,
        server.deploy_with(repo, commit_version(repo, "v2"), blue_green(), service),
        "Success",
        "v2",
    )
    check_migrated(world, d2, "v2", ["v1", "v2"])
    check_gate_asked(world, d2)
    r2, url = d2["green_revision"], d2["result"]["url"]
    wait_until(lambda: revisions_running(server, service) == {r2}, 60, "v1 to be retired")

    # --- v3's migration fails: Failed, nothing changed, v2 answers every request ---
    (repo / "migration_fails.txt").write_text("1\n")
    v3 = commit_version(repo, "v3")
    rec = Recorder(url, connections=4).start()
    try:
        wait_until(lambda: len(rec.answers()) >= 30, 30, "load to reach v2")
        since = rec.step("v3 with a failing migration")
        d3 = final(server, server.deploy_with(repo, v3, blue_green(), service), "Failed", "v3")
        wait_until(lambda: len(rec.answers(since=since)) >= 30, 30, "load after v3 failed")
    finally:
        rec.stop()
    assert not rec.failures(), rec.describe_failures()
    assert set(rec.bodies(since=since)) == {"notes v2"}, dict(rec.bodies(since=since))
    assert d3["error"]["type"] == "HookFailed", d3["error"]
    assert "3" in d3["error"]["message"], d3["error"]  # the exit code
    assert "column notes.tags already exists" in d3["error"]["message"], d3["error"]
    hook = stage(d3, "hook_pre_deploy")
    assert hook["status"] == "failed" and hook["detail"].get("exit_code") == 3, hook
    names = [s["name"] for s in d3["stages"]]
    assert "start" not in names and not any("rollback" in n for n in names), names
    # nothing of v3 ever started; the failed attempt ran once and applied nothing
    assert len(migration_posts(world, "attempts", "v3")) == 1
    assert migration_posts(world, "applied", "v3") == []
    assert start_reads(world, "v3") == [], "a v3 replica started after its migration failed"
    svc = server.service(service)
    assert svc["weights"] == {r2: 100}, svc
    assert revisions_running(server, service) == {r2}, svc
    failed = [r for r in audit(server, d3["id"]) if r["event_type"] == "hook.failed"]
    assert len(failed) == 1 and failed[0]["detail"]["exit_code"] == 3, failed
    assert "already exists" not in json.dumps(failed), "hook output belongs in the log only"
    assert "column notes.tags already exists" in build_log(server, d3["id"])
    assert gate_asks(world, d3["id"]) == [], "v3's gate was asked after its migration failed"
    # the team hears of it (the module's sink gets every event)
    wait_until(
        lambda: (
            {"deployment.failed", "stage.done"}
            <= {r.json()["event"] for r in delivered_to(world, d3["id"])}
        ),
        60,
        "v3's deployment.failed notification",
    )


# --- secrets: visible to the app, nowhere else; a rollback restores the version it used --------


def secret_view(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{url}/release/secrets", timeout=10).json()
    return doc


def test_a_secret_reaches_its_app_and_nowhere_else_and_a_rollback_restores_its_version(
    world: World, tmp_path: Path
) -> None:
    server, service = world.server, "vaulted"
    assert server.client is not None
    first, second = "pw1-" + secrets.token_hex(16), "pw2-" + secrets.token_hex(16)
    api_key = "key-" + secrets.token_hex(16)
    repo = release_repo(  # with the migration: a hook gets the secrets a replica gets
        tmp_path / "repo",
        service,
        env={"MIGRATIONS_URL": world.migrations.url},
        run_extra='secrets = ["DB_PASSWORD"]\nsecret_files = { API_KEY = "api-key" }\n',
        sections=MIGRATION,
    )
    write = ("secret:write",)

    # --- not set yet: the deployment fails before anything starts, saying what to do ---
    d0 = final(server, server.deploy_with(repo, head(repo), blue_green(), service), "Failed", "d0")
    assert d0["error"]["type"] == "SecretMissing", d0["error"]
    assert f"shipyard secret set {service}" in d0["error"]["message"], d0["error"]
    assert "start" not in [s["name"] for s in d0["stages"]], d0["stages"]
    assert migration_posts(world, "attempts", "v1", service) == [], "the hook ran without it"

    # --- set from stdin (one trailing newline stripped), listed without values ---
    world.shipyard("secret", "set", service, "DB_PASSWORD", perms=write, stdin=first + "\n")
    world.shipyard("secret", "set", service, "API_KEY", perms=write, stdin=api_key)
    listed = world.shipyard("secret", "list", service, perms=write).stdout
    assert "DB_PASSWORD" in listed and "API_KEY" in listed, listed
    refused = world.shipyard("secret", "set", service, "X", stdin=first, check=False)
    assert refused.returncode != 0, "a token without secret:write set a secret"

    d1 = final(server, server.deploy_with(repo, head(repo), blue_green(), service), "Success", "v1")
    url, r1 = d1["result"]["url"], d1["green_revision"]
    used1 = dict(d1["secrets"])
    assert set(used1) == {"DB_PASSWORD", "API_KEY"}, used1
    view = secret_view(url)
    assert view["db_password"] == first, "the replica's env has the secret, newline stripped"
    assert view["files"] == {"api-key": {"value": api_key, "mode": "0o400", "owned": True}}, view
    assert view["dir_mode"] == "0o700", view
    # the migration ran with the secret, and the deployment's log masks what it printed
    (migrated,) = migration_posts(world, "applied", "v1", service)
    assert migrated.json()["has_db_password"] is True, migrated.json()
    assert "connecting as notes with password" in build_log(server, d1["id"])

    # --- a new value, a new deployment; then a cold rollback restores the old value ---
    world.shipyard("secret", "set", service, "DB_PASSWORD", perms=write, stdin=second)
    d2 = final(
        server,
        server.deploy_with(repo, commit_version(repo, "v2"), blue_green(), service),
        "Success",
        "v2",
    )
    assert d2["secrets"]["DB_PASSWORD"] > used1["DB_PASSWORD"], (used1, d2["secrets"])
    assert d2["secrets"]["API_KEY"] == used1["API_KEY"], (used1, d2["secrets"])
    assert secret_view(url)["db_password"] == second
    r2 = d2["green_revision"]
    wait_until(lambda: revisions_running(server, service) == {r2}, 60, "v1 to be retired")
    rb = final(server, server.rollback(d2["id"]), "Success", "cold rollback to v1")
    assert server.service(service)["weights"] == {r1: 100}
    assert secret_view(url)["db_password"] == first, "the rollback did not restore version 1"

    # --- the audit trail says who set which secret, never its value ---
    trail_text = world.shipyard(
        "audit", "show", "--data-dir", str(server.data_dir), "--format", "json"
    ).stdout
    set_records = [
        r
        for r in json.loads(trail_text)
        if r["event_type"] == "secret.set" and r["service"] == service
    ]
    assert [r["detail"]["name"] for r in set_records] == ["DB_PASSWORD", "API_KEY", "DB_PASSWORD"]
    versions = [r["detail"]["version"] for r in set_records]
    assert versions[2] > versions[0] == used1["DB_PASSWORD"], (versions, used1)
    assert all(r["user"] for r in set_records), set_records

    # --- nowhere else: API answers, CLI output, the data directory's files ---
    values = [first, second, api_key]
    needles = [v.encode() for v in values] + [base64.b64encode(v.encode()) for v in values]
    answers = [
        server.client.get(path).text
        for path in (
            *(f"/api/v1/deployments/{d['id']}" for d in (d0, d1, d2, rb)),
            *(f"/api/v1/deployments/{d['id']}/audit" for d in (d0, d1, d2, rb)),
            *(f"/api/v1/deployments/{d['id']}/logs" for d in (d0, d1, d2, rb)),
            f"/api/v1/deployments?service={service}",
            f"/api/v1/services/{service}",
            f"/api/v1/services/{service}/logs",
            "/api/v1/services",
            "/metrics",
        )
    ]
    with httpx.Client(
        base_url=server.base, headers={"authorization": f"Bearer {world.token(*write)}"}
    ) as c:
        listing = c.get(f"/api/v1/services/{service}/secrets")
        assert listing.status_code == 200, listing.text
        answers.append(listing.text)
    outputs = [
        world.shipyard("status", d2["id"]).stdout,
        world.shipyard("status", service).stdout,
        world.shipyard("status", d2["id"], "--format", "json").stdout,
        listed,
        world.shipyard("secret", "list", service, perms=write).stdout,
        trail_text,
        world.shipyard("logs", service, check=False).stdout,
    ]
    for text in answers + outputs:
        for value in values:
            assert value not in text, f"a secret value leaked into: {text[:300]}..."
    # Where values belong: the replicas' own secret files (0400, nothing else in them), and the
    # agent's state file, which holds the specs it restarts replicas from (documented in
    # agent/secret_files.py: 0600 in the agent's 0700 directory).
    state = server.data_dir / "agents" / "local" / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600, oct(state.stat().st_mode)
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700, oct(state.parent.stat().st_mode)
    leaks = [
        p
        for p in files_holding(server.data_dir, needles)
        if (server.data_dir / p) != state
        and not (
            (server.data_dir / p).read_bytes() in {v.encode() for v in values}
            and stat.S_IMODE((server.data_dir / p).stat().st_mode) == 0o400
        )
    ]
    assert leaks == [], f"secret values in data directory files: {leaks}"

    # --- removed: no longer listed, audited; the next deployment would miss it ---
    world.shipyard("secret", "rm", service, "API_KEY", perms=write)
    listed = world.shipyard("secret", "list", service).stdout
    assert "DB_PASSWORD" in listed and "API_KEY" not in listed, listed
    trail = json.loads(
        world.shipyard(
            "audit", "show", "--data-dir", str(server.data_dir), "--format", "json"
        ).stdout
    )
    removed = [r for r in trail if r["event_type"] == "secret.removed" and r["service"] == service]
    assert [r["detail"]["name"] for r in removed] == ["API_KEY"], removed
    d3 = final(server, server.deploy_with(repo, head(repo), blue_green(), service), "Failed", "d3")
    assert d3["error"]["type"] == "SecretMissing" and "API_KEY" in d3["error"]["message"], d3
    assert server.service(service)["weights"] == {r1: 100}, "a failed pre-flight changed nothing"


# --- notifications: signed, never lost --------------------------------------------------------


def notify_verify(secret: str, req: Request, tolerance: int = 300) -> bool:
    """``shipyard.notify.signing.verify``, the helper the README tells receivers to copy."""
    return signing.verify(secret.encode(), req.headers, req.body, tolerance=tolerance)


def delivered_to(world: World, dep_id: str) -> list[Request]:
    """The notifications about ``dep_id`` the receiver got (retries included)."""
    return [
        r
        for r in world.receiver.snapshot()
        if r.path == "/shipyard" and r.json().get("deployment", {}).get("id") == dep_id
    ]


def notification_states(server: Server, dep_id: str) -> list[dict[str, Any]]:
    return list(server.deployment(dep_id).get("notifications") or [])


def test_signed_notifications_of_every_state_change_arrive_after_a_down_receiver_and_kill_9(
    world: World, tmp_path: Path
) -> None:
    server, service = world.server, "announced"
    repo = release_repo(tmp_path / "repo", service, example="hello")
    world.receiver.down()
    try:
        d1 = final(
            server, server.deploy_with(repo, head(repo), blue_green(), service), "Success", "v1"
        )
        d2_id = server.deploy_with(
            repo,
            commit_version(repo, "v2"),
            canary({"weight": 50, "duration_seconds": 1, "analysis": SELF_LOADED, "pause": True}),
            service,
        )
        wait_for_state(
            lambda: server.deployment(d2_id),
            lambda d: d["status"] in ("Paused", "Success", "Failed", "RolledBack"),
            90,
            "v2 to pause at its gate",
        )
        d2 = server.deployment(d2_id)
        assert d2["status"] == "Paused", (d2["error"], [s["name"] for s in d2["stages"]])
        # the receiver is down: what happened so far waits in the outbox, retried, visible
        states = wait_for_state(
            lambda: notification_states(server, d1["id"]),
            lambda s: bool(s) and any(n["attempts"] >= 1 and n["last_error"] for n in s),
            60,
            "v1's notifications to be attempted",
        )
        assert all(n["state"] == "pending" for n in states), states
        assert all(n["sink"] == SINK for n in states), states
        shown = world.shipyard("status", d1["id"]).stdout
        assert SINK in shown and "pending" in shown, shown
        # kill -9 of the control plane with all of it undelivered
        world.kill9_and_restart()
    finally:
        world.receiver.up()
    server.promote(d2_id)
    d2 = final(server, d2_id, "Success", "v2 promoted")

    def announced(dep_id: str) -> dict[int, dict[str, Any]]:
        """The deployment's audit records that are notification events, by seq."""
        return {
            r["seq"]: r for r in audit(server, dep_id) if event_of(r["event_type"], r["detail"])
        }

    def all_delivered(dep_id: str) -> None:
        """Until the receiver has every announced record and the API says delivered."""
        wait_for_state(
            lambda: (
                set(announced(dep_id)),
                {r.json()["audit"]["seq"] for r in delivered_to(world, dep_id)},
            ),
            lambda seen: seen[0] <= seen[1],
            120,  # retries back off exponentially, capped at 5 s here (retry_cap_seconds)
            f"every notification of {dep_id} at the receiver (announced, received)",
        )
        wait_for_state(
            lambda: notification_states(server, dep_id),
            lambda s: bool(s) and all(n["state"] == "delivered" for n in s),
            60,
            f"every notification of {dep_id} delivered",
        )

    for dep, expected in (
        (d1, {"deployment.started", "stage.done", "deployment.succeeded"}),
        (
            d2,
            {
                "deployment.started",
                "stage.done",
                "deployment.paused",
                "deployment.promoted",
                "deployment.succeeded",
            },
        ),
    ):
        all_delivered(dep["id"])
        got = delivered_to(world, dep["id"])
        states = notification_states(server, dep["id"])
        by_key: dict[str, Request] = {}
        for req in got:
            key = req.headers.get("idempotency-key", "")
            assert key, f"no Idempotency-Key: {req.headers}"
            assert signed(world.sink_secret, req), f"bad signature: {req.headers}"
            assert notify_verify(world.sink_secret, req), "notify.verify refused a good one"
            assert req.headers.get("x-shipyard-event") == req.json()["event"], req.headers
            if key in by_key:  # at least once: a retry is the same notification
                assert by_key[key].body == req.body, key
            by_key[key] = req
        docs = [r.json() for r in by_key.values()]
        events = {d["event"] for d in docs}
        assert expected <= events, f"{dep['id']}: got {sorted(events)}, want {sorted(expected)}"
        assert events <= EVENTS, events
        assert len(states) == len(by_key), (states, sorted(by_key))
        # each one is an audit record of the deployment: the receiver can check it there
        trail = {r["seq"]: r for r in audit(server, dep["id"])}
        assert set(announced(dep["id"])) <= {d["audit"]["seq"] for d in docs}, docs
        for doc in docs:
            seq, digest = doc["audit"]["seq"], doc["audit"]["hash"]
            assert doc["deployment"]["id"] == dep["id"], doc
            assert seq in trail and trail[seq]["hash"] == digest, f"{doc} not in the audit trail"
            assert doc["event"] == event_of(trail[seq]["event_type"], trail[seq]["detail"]), doc

    # a receiver rejects what was tampered with or replayed
    sample = delivered_to(world, d2["id"])[0]
    tampered = Request(sample.method, sample.path, sample.headers, sample.body + b" ", sample.at)
    assert not signed(world.sink_secret, tampered) and not notify_verify(
        world.sink_secret, tampered
    )
    assert not notify_verify("whsec_wrong", sample)
    stamp = int(sample.headers["x-shipyard-timestamp"])
    wait_until(lambda: time.time() > stamp + 2, 10, "the sample to be 2 s old")
    assert not notify_verify(world.sink_secret, sample, tolerance=1), "a replay was accepted"
    # the sink's secret is sealed at rest and never in the server's log
    assert files_holding(server.data_dir, [world.sink_secret.encode()]) == []


# --- freeze instead of rollback ------------------------------------------------------------------


def stays(
    server: Server, dep_id: str, service: str, weights: dict[str, int], seconds: float
) -> None:
    """For ``seconds``, every look finds ``dep_id`` Frozen and the weights unchanged."""
    deadline = time.monotonic() + seconds
    looks = 0
    while time.monotonic() < deadline or looks < 3:
        doc, svc = server.deployment(dep_id), server.service(service)
        assert doc["status"] == "Frozen", (
            f"left Frozen on its own: {doc['status']} {doc.get('error')}"
        )
        assert svc["weights"] == weights, f"weights moved while Frozen: {svc['weights']}"
        looks += 1
        time.sleep(0.5)  # the pace of the looks, not a synchronisation


def test_a_frozen_deployment_stays_frozen_until_a_human_promotes_or_aborts_it(
    world: World, tmp_path: Path
) -> None:
    server, service = world.server, "frozen"
    assert server.client is not None
    repo = release_repo(
        tmp_path / "repo", service, example="hello", sections='[deploy]\non_failure = "freeze"\n'
    )
    d1 = final(server, server.deploy_with(repo, head(repo), blue_green(), service), "Success", "v1")
    r1, url = d1["green_revision"], d1["result"]["url"]
    rec = Recorder(url, connections=4).start()  # the analysis needs requests
    try:
        # --- v2 fails its analysis at 20%: Frozen there, not rolled back ---
        v2 = commit_version(repo, "v2", error_rate=0.5)
        d2_id = server.deploy_with(
            repo,
            v2,
            canary({"weight": 20, "duration_seconds": 2, "analysis": FAST_ANALYSIS}),
            service,
        )
        d2 = wait_for_state(
            lambda: server.deployment(d2_id),
            lambda d: d["status"] in ("Frozen", "Success", "Failed", "RolledBack"),
            180,
            "v2 to freeze",
        )
        assert d2["status"] == "Frozen", d2
        r2 = d2["green_revision"]
        split = {r1: 80, r2: 20}
        assert server.service(service)["weights"] == split
        frozen = [r for r in audit(server, d2_id) if r["event_type"] == "deployment.frozen"]
        assert len(frozen) == 1, [r["event_type"] for r in audit(server, d2_id)]
        stays(server, d2_id, service, split, 5)
        # a manual rollback of the service is refused while it is frozen
        refused = server.client.post(f"/api/v1/rollback/{d1['id']}")
        assert refused.status_code == 409 and "frozen" in refused.text, refused.text
        # --- kill -9 of serve: still Frozen, nothing re-run ---
        before = {r["seq"] for r in audit(server, d2_id)}
        world.kill9_and_restart()
        stays(server, d2_id, service, split, 3)
        since = [r["event_type"] for r in audit(server, d2_id) if r["seq"] not in before]
        assert set(since) <= {"deployment.resumed", "deployment.taken_over"}, since
        shown = world.shipyard("status", d2_id).stdout
        assert "Frozen" in shown, shown
        # --- promote needs a reason, then goes on from the step after the failed one ---
        no_reason = world.shipyard("promote", d2_id, check=False)
        assert no_reason.returncode != 0 and "reason" in (no_reason.stdout + no_reason.stderr)
        no_body = server.client.post(f"/api/v1/deployments/{d2_id}/promote")
        assert no_body.status_code == 409 and "reason" in no_body.text, no_body.text
        stays(server, d2_id, service, split, 1)
        reason = "migration 0042 is irreversible; the 500s are a known flaky endpoint"
        world.shipyard("promote", d2_id, "--reason", reason)
        d2 = final(server, d2_id, "Success", "v2 promoted out of Frozen")
        assert server.service(service)["weights"] == {r2: 100}
        unfrozen = [r for r in audit(server, d2_id) if r["event_type"] == "deployment.unfrozen"]
        assert len(unfrozen) == 1, [r["event_type"] for r in audit(server, d2_id)]
        assert unfrozen[0]["detail"].get("reason") == reason, unfrozen
        assert unfrozen[0]["detail"].get("action") == "promote", unfrozen
        assert unfrozen[0]["user"], unfrozen

        # --- v3 freezes too; abort (with a reason) rolls it back ---
        wait_until(lambda: revisions_running(server, service) == {r2}, 60, "v1 to be retired")
        d3_id = server.deploy_with(
            repo,
            commit_version(repo, "v3", error_rate=0.5),
            canary({"weight": 20, "duration_seconds": 2, "analysis": FAST_ANALYSIS}),
            service,
        )
        d3 = wait_for_state(
            lambda: server.deployment(d3_id),
            lambda d: d["status"] in ("Frozen", "Success", "Failed", "RolledBack"),
            180,
            "v3 to freeze",
        )
        assert d3["status"] == "Frozen", d3
        r3 = d3["green_revision"]
        stays(server, d3_id, service, {r2: 80, r3: 20}, 2)
        world.shipyard("abort", d3_id, "--reason", "the schema change is wrong: back to v2")
        final(server, d3_id, "RolledBack", "v3 aborted out of Frozen")
        assert server.service(service)["weights"] == {r2: 100}
        aborted = [r for r in audit(server, d3_id) if r["event_type"] == "deployment.unfrozen"]
        assert [r["detail"].get("action") for r in aborted] == ["abort"], aborted
    finally:
        rec.stop()

    # --- the freeze was notified (the receiver is up in this test) ---
    wait_until(
        lambda: any(
            r.headers.get("x-shipyard-event") == "deployment.frozen"
            for r in delivered_to(world, d3_id)
        ),
        120,
        "the deployment.frozen notification of v3",
    )
