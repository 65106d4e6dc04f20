"""``/api/v1/notifications/sinks`` in-process (permission, validation that never echoes a
secret, listing without credentials, the test send, auditing) and a deployment's
``notifications`` in ``GET /deployments/{id}``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shipyard.api.app import create_app
from shipyard.api.context import AppContext
from shipyard.api.tokens import TokenService
from shipyard.audit.log import SqlAuditLog
from shipyard.notify.sinks import OutboxWriter, SinkService
from shipyard.security.sealing import Sealer
from shipyard.settings import Settings
from shipyard.store.outbox import OutboxStore
from tests.api.test_api import Harness, body

ADMIN = "notifications:admin"
SECRET = "whsec-api-test-0123456789"
SLACK = "https://hooks.slack.test/services/T1/B1/sl4ckS3cret"


class NotifyHarness(Harness):
    """The API harness with the SQL audit log writing the outbox, and sinks."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.audit = SqlAuditLog(  # type: ignore[assignment]
            self.store.engine,
            tmp / "audit.head",
            clock=self.clock.now,
            on_append=OutboxWriter(self.clock.now).on_append,
        )
        self.tokens = TokenService(self.tokens.authority, self.tokens.store, self.audit)
        self.sinks = SinkService(
            OutboxStore(self.store.engine), Sealer.for_dir(tmp), self.clock.now
        )

    async def context(self, settings: Settings) -> AppContext:
        made = await super().context(settings)
        made.notifications = self.sinks
        self.pipeline = made.pipeline
        return made


@pytest.fixture
def nh(tmp_path: Path) -> NotifyHarness:
    return NotifyHarness(tmp_path)


@pytest.fixture
async def api(nh: NotifyHarness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(nh.settings, context_factory=nh.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            yield c


def hook(**over: object) -> dict[str, object]:
    return {
        "name": "ops",
        "type": "webhook",
        "url": "http://127.0.0.1:9/in",
        "secret": SECRET,
        **over,
    }


async def test_sinks_need_notifications_admin(api: httpx.AsyncClient, nh: NotifyHarness) -> None:
    deployer = nh.headers("deployment:create", "deployment:read")
    for method, path in [
        ("GET", "/api/v1/notifications/sinks"),
        ("POST", "/api/v1/notifications/sinks"),
        ("DELETE", "/api/v1/notifications/sinks/ops"),
        ("POST", "/api/v1/notifications/sinks/ops/test"),
    ]:
        r = await api.request(method, path, headers=deployer, json=hook())
        assert r.status_code == 403, (method, path, r.text)
    assert (await api.get("/api/v1/notifications/sinks")).status_code == 401
    assert nh.sinks.list() == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        pytest.param({"secret": "short"}, "secret: Value error, must be at least 16", id="short"),
        pytest.param({"url": "ftp://x/y"}, "url: Value error, must be an http", id="url"),
        pytest.param({"events": ["deploy.done"]}, "unknown event(s) ['deploy.done']", id="event"),
        pytest.param({"type": "pager"}, "does not match any of the expected tags", id="type"),
        pytest.param({"name": "Not A Label"}, "name: String should match", id="name"),
        pytest.param({"extra": 1}, "extra: Extra inputs are not permitted", id="extra"),
    ],
)
async def test_a_bad_sink_is_a_422_that_never_echoes_the_secret(
    api: httpx.AsyncClient, nh: NotifyHarness, change: dict[str, object], says: str
) -> None:
    sent = hook(**change)
    if "secret" not in change:
        sent["secret"] = SECRET
    r = await api.post("/api/v1/notifications/sinks", json=sent, headers=nh.headers(ADMIN))
    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]
    assert SECRET not in r.text
    assert nh.sinks.list() == []


async def test_add_list_remove_never_show_a_credential_and_are_audited(
    api: httpx.AsyncClient, nh: NotifyHarness
) -> None:
    admin = nh.headers(ADMIN, subject="ops-admin")
    r = await api.post("/api/v1/notifications/sinks", json=hook(), headers=admin)
    assert r.status_code == 201, r.text
    slack = {"name": "team", "type": "slack", "url": SLACK, "events": ["deployment.failed"]}
    assert (
        await api.post("/api/v1/notifications/sinks", json=slack, headers=admin)
    ).status_code == 201
    again = await api.post("/api/v1/notifications/sinks", json=hook(), headers=admin)
    assert again.status_code == 409 and "exists" in again.json()["detail"]
    listed = await api.get("/api/v1/notifications/sinks", headers=admin)
    assert [(s["name"], s["type"], s["url"], s["events"]) for s in listed.json()["sinks"]] == [
        ("ops", "webhook", "http://127.0.0.1:9/in", []),
        ("team", "slack", "https://hooks.slack.test/...", ["deployment.failed"]),
    ]
    gone = await api.delete("/api/v1/notifications/sinks/team", headers=admin)
    assert gone.json() == {"name": "team", "removed": True}
    assert (await api.delete("/api/v1/notifications/sinks/team", headers=admin)).status_code == 404
    records = await nh.audit.records()
    sink_records = [r for r in records if r.event_type.startswith("notification_sink.")]
    assert [(r.event_type, r.user, r.detail["sink"]) for r in sink_records] == [
        ("notification_sink.added", "ops-admin", "ops"),
        ("notification_sink.added", "ops-admin", "team"),
        ("notification_sink.removed", "ops-admin", "team"),
    ]
    everything = r.text + listed.text + json.dumps([x.to_dict() for x in records])
    assert SECRET not in everything and "sl4ckS3cret" not in everything


async def test_the_test_send_says_what_the_sink_answered(
    api: httpx.AsyncClient, nh: NotifyHarness
) -> None:
    admin = nh.headers(ADMIN)
    await api.post("/api/v1/notifications/sinks", json=hook(), headers=admin)
    r = await api.post("/api/v1/notifications/sinks/ops/test", headers=admin)  # port 9: closed
    assert r.status_code == 200
    assert r.json() == {
        "name": "ops",
        "delivered": False,
        "error": "connection failed (ConnectError)",
    }
    assert (
        await api.post("/api/v1/notifications/sinks/nope/test", headers=admin)
    ).status_code == 404


async def test_a_deployment_shows_its_notifications_delivery_state(
    api: httpx.AsyncClient, nh: NotifyHarness
) -> None:
    await api.post(
        "/api/v1/notifications/sinks",
        json=hook(events=["deployment.started", "deployment.succeeded"]),
        headers=nh.headers(ADMIN),
    )
    r = await api.post("/api/v1/deploy", json=body(), headers=nh.headers())
    dep_id = r.json()["deployment_id"]
    await nh.until(dep_id, "Success")
    # The final status is saved before the end is audited (the event its notification is):
    # the pipeline's wait returns once that is done too.
    await nh.pipeline.wait(dep_id)
    doc = (await api.get(f"/api/v1/deployments/{dep_id}", headers=nh.headers())).json()
    # No delivery worker runs in this harness: both wait, in the order they happened.
    assert doc["notifications"] == [
        {
            "sink": "ops",
            "event": "deployment.started",
            "state": "pending",
            "attempts": 0,
            "last_error": None,
            "delivered_at": None,
        },
        {
            "sink": "ops",
            "event": "deployment.succeeded",
            "state": "pending",
            "attempts": 0,
            "last_error": None,
            "delivered_at": None,
        },
    ]
