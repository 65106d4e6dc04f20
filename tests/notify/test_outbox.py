"""The outbox on SQLite and PostgreSQL: rows written in the audit record's transaction, sinks'
filters, claims that keep two workers off one row and expire with a dead one, and sealed
credentials."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, func, select

from shipyard.audit import AuditEvent
from shipyard.audit.chain import AuditRecord
from shipyard.audit.log import Publication, SqlAuditLog, audit_log, record_publication
from shipyard.errors import Conflict
from shipyard.notify.sinks import OutboxWriter, SinkService
from shipyard.store.outbox import notification_outbox, notification_sinks

from .conftest import SLACK_URL, WEBHOOK_SECRET, Now, slack, webhook

T = Now().value  # when the rows were written (the fixture's clock does not move here)


def failed(deployment_id: str = "d1") -> AuditEvent:
    return AuditEvent(
        event_type="deployment.failed",
        deployment_id=deployment_id,
        service="web",
        region="local",
        user="alice",
        status="Failed",
        detail={"error": "boom"},
    )


async def test_an_appended_event_puts_a_row_per_interested_sink_in_the_outbox(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    sinks.add(webhook("all"), "alice")  # type: ignore[arg-type]
    sinks.add(webhook("failures", events=["deployment.failed"]), "alice")  # type: ignore[arg-type]
    sinks.add(webhook("starts", events=["deployment.started"]), "alice")  # type: ignore[arg-type]
    record = await audit.append(failed())
    await audit.append(AuditEvent(event_type="token.revoked", user="alice"))  # not an event
    rows = sinks.outbox.rows()
    by_sink = {sinks.outbox.sinks_by_id([r.sink_id])[r.sink_id].name: r for r in rows}
    assert sorted(by_sink) == ["all", "failures"]
    row = by_sink["all"]
    assert (row.event, row.audit_seq, row.deployment_id, row.state) == (
        "deployment.failed",
        record.seq,
        "d1",
        "pending",
    )
    body = json.loads(row.body)
    assert body["audit"] == {"seq": record.seq, "hash": record.hash}
    assert by_sink["all"].key != by_sink["failures"].key


async def test_an_append_that_fails_leaves_neither_the_record_nor_its_notifications(
    engine: Engine, sinks: SinkService, tmp_path: Path, clock: Now
) -> None:
    """The writer runs in the append's transaction: when anything after it fails, its rows go
    with the record."""
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    writer = OutboxWriter(clock.now)

    def then_fail(conn: Connection, record: AuditRecord) -> None:
        writer.on_append(conn, record)
        assert conn.execute(select(func.count()).select_from(notification_outbox)).scalar() == 1
        raise Conflict("the transaction fails after the outbox insert")

    broken = SqlAuditLog(engine, tmp_path / "audit.head", on_append=then_fail)
    with pytest.raises(Conflict):
        await broken.append(failed())
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_log)).scalar() == 0
    assert sinks.outbox.rows() == []


async def test_no_sink_no_row_and_the_body_names_the_deployment(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    await audit.append(failed())
    assert sinks.outbox.rows() == []
    sinks.add(slack(), "alice")  # type: ignore[arg-type]
    await audit.append(failed("d2"))
    (row,) = sinks.outbox.rows(deployment_id="d2")
    assert json.loads(row.body)["deployment"]["service"] == "web"


def test_credentials_are_sealed_at_rest_and_never_listed(
    engine: Engine, sinks: SinkService
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    sinks.add(slack(), "alice")  # type: ignore[arg-type]
    with engine.connect() as conn:
        stored = repr(conn.execute(select(notification_sinks)).all())
    assert WEBHOOK_SECRET not in stored and "XyZsecretpath" not in stored
    listed = json.dumps([v.to_dict() for v in sinks.list()])
    assert WEBHOOK_SECRET not in listed and "XyZsecretpath" not in listed
    assert "https://hooks.slack.test/..." in listed
    hook, team = sinks.get("hook"), sinks.get("team")
    assert sinks.secret(hook) == WEBHOOK_SECRET.encode()
    assert sinks.target(team) == SLACK_URL
    assert sinks.secret(team) is None


def test_a_sink_name_is_taken_once(sinks: SinkService) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="exists"):
        sinks.add(webhook(), "bob")  # type: ignore[arg-type]


def test_the_config_file_sinks_replace_the_previous_files(sinks: SinkService) -> None:
    sinks.add(webhook("api-one"), "alice")  # type: ignore[arg-type]
    sinks.apply_config((webhook("a"), webhook("b")))  # type: ignore[arg-type]
    sinks.apply_config((webhook("b", events=["deployment.failed"]), webhook("api-one")))  # type: ignore[arg-type]
    listed = {v.name: v for v in sinks.list()}
    assert sorted(listed) == ["api-one", "b"]
    assert listed["b"].events == ("deployment.failed",)
    assert listed["api-one"].source == "config"  # the file wins a name


async def test_a_claim_keeps_other_workers_off_until_it_expires(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed())
    store = sinks.outbox
    (mine,) = store.claim("worker-a", now=T + 100.0, seconds=60.0, limit=10)
    assert store.claim("worker-b", now=T + 159.0, seconds=60.0, limit=10) == []
    # worker-a died: at 160 its claim has expired and worker-b takes the row.
    (theirs,) = store.claim("worker-b", now=T + 160.0, seconds=60.0, limit=10)
    assert theirs.id == mine.id and theirs.key == mine.key  # the same idempotency key
    assert not store.mark_delivered(mine.id, "worker-a", T + 161.0)  # a lost claim records nothing
    assert store.mark_delivered(theirs.id, "worker-b", T + 161.0)
    (row,) = store.rows()
    assert (row.state, row.attempts, row.delivered_at, row.claimed_by) == (
        "delivered",
        1,
        T + 161.0,
        None,
    )
    assert store.claim("worker-a", now=T + 1000.0, seconds=60.0, limit=10) == []


async def test_racing_workers_claim_each_row_exactly_once(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    for i in range(12):
        await audit.append(failed(f"d{i}"))
    got: dict[str, list[int]] = {}
    start = threading.Barrier(4)

    def work(name: str) -> None:
        start.wait()
        got[name] = [r.id for r in sinks.outbox.claim(name, T + 100.0, 60.0, 100)]

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for ids in got.values() for i in ids]
    assert sorted(claimed) == sorted(r.id for r in sinks.outbox.rows())
    assert len(claimed) == len(set(claimed)) == 12


async def test_a_failed_attempt_waits_until_its_retry_time(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed())
    store = sinks.outbox
    (row,) = store.claim("w", now=T + 100.0, seconds=60.0, limit=1)
    assert store.mark_attempt_failed(row.id, "w", "HTTP 503", retry_at=T + 130.0)
    assert store.claim("w", now=T + 129.0, seconds=60.0, limit=1) == []
    (again,) = store.claim("w", now=T + 130.0, seconds=60.0, limit=1)
    assert (again.attempts, again.last_error) == (1, "HTTP 503")
    assert store.mark_attempt_failed(again.id, "w", "timeout", retry_at=None)
    (done,) = store.rows()
    assert (done.state, done.attempts, done.last_error) == ("failed", 2, "timeout")
    assert store.claim("w", now=10_000.0, seconds=60.0, limit=1) == []
    (shown,) = store.deliveries("d1")
    assert (shown.sink, shown.state, shown.attempts, shown.last_error) == (
        "hook",
        "failed",
        2,
        "timeout",
    )


async def test_a_restart_with_the_same_config_keeps_the_sinks_pending_rows(
    sinks: SinkService, audit: SqlAuditLog
) -> None:
    """The config is applied at every start: a sink it names again keeps its id, so what was
    not delivered before the restart still goes to it."""
    sinks.apply_config((webhook("hook"),))  # type: ignore[arg-type]
    await audit.append(failed())
    before = sinks.get("hook")
    sinks.apply_config((webhook("hook", url="http://moved.test/in"),))  # type: ignore[arg-type]
    after = sinks.get("hook")
    assert after.id == before.id and after.url == "http://moved.test/in"
    assert sinks.secret(after) == WEBHOOK_SECRET.encode()  # sealed again under the same id
    (row,) = sinks.outbox.rows()
    assert sinks.outbox.sinks_by_id([row.sink_id])[row.sink_id].name == "hook"


def test_a_published_checkpoint_is_an_audit_checkpoint_notification(
    engine: Engine, sinks: SinkService, clock: Now
) -> None:
    sinks.add(webhook("cp", events=["audit.checkpoint"]), "alice")  # type: ignore[arg-type]
    sinks.add(webhook("deploys", events=["deployment.failed"]), "alice")  # type: ignore[arg-type]
    writer = OutboxWriter(clock.now)
    publication = Publication(
        published_at="2026-01-02T03:04:05+00:00",
        witness="file:/witness/checkpoint",
        tree_size=42,
        root_hash="b" * 64,
        checkpoint="signed note",
    )
    assert record_publication(engine, publication, writer.on_publish)
    assert not record_publication(engine, publication, writer.on_publish)  # seen: no new row
    (row,) = sinks.outbox.rows()
    assert (row.event, row.audit_seq, row.deployment_id) == ("audit.checkpoint", None, None)
    assert json.loads(row.body) == {
        "event": "audit.checkpoint",
        "checkpoint": {
            "witness": "file:/witness/checkpoint",
            "tree_size": 42,
            "root_hash": "b" * 64,
        },
        "occurred_at": "2026-01-02T03:04:05+00:00",
    }
