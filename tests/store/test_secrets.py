"""App secrets at rest (``store/secrets.py`` through ``security/app_secrets.AppSecrets``), on
SQLite and PostgreSQL: versions count up and are never reused, removed ones stay readable by
version (a rollback needs them) but are not current, the value is sealed (not in the database),
and it opens only with the key that sealed it, on the row it was sealed for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text, update

from shipyard.audit import MemoryAuditLog
from shipyard.errors import InvalidInput, NotFound, SecretMissing
from shipyard.security.app_secrets import AppSecrets
from shipyard.security.sealing import Sealer, SealingError
from shipyard.store.engine import open_engine
from shipyard.store.secrets import SecretStore, app_secrets

VALUE = "hunter2-ZmFrZS1kYi1wYXNzd29yZA"


@pytest.fixture
def engine(database: str | None, tmp_path: Path) -> Iterator[Engine]:
    made = open_engine(database, tmp_path)
    yield made
    made.dispose()


def vault(engine: Engine, shared: Path) -> AppSecrets:
    return AppSecrets(SecretStore(engine), Sealer.for_dir(shared), MemoryAuditLog())


async def test_versions_count_up_and_are_never_reused(engine: Engine, tmp_path: Path) -> None:
    s = vault(engine, tmp_path / "shared")
    assert (await s.set("hello", "DB_PASSWORD", "one", by="alice")).version == 1
    assert (await s.set("hello", "DB_PASSWORD", "two", by="bob")).version == 2
    assert (await s.set("other", "DB_PASSWORD", "x", by="bob")).version == 1  # per service
    assert await s.current_versions("hello", ["DB_PASSWORD"]) == {"DB_PASSWORD": 2}
    assert await s.values("hello", {"DB_PASSWORD": 1}) == {"DB_PASSWORD": "one"}
    assert await s.values("hello", {"DB_PASSWORD": 2}) == {"DB_PASSWORD": "two"}
    listed = await s.list("hello")
    assert [(v.name, v.version, v.created_by) for v in listed] == [("DB_PASSWORD", 2, "bob")]

    assert await s.remove("hello", "DB_PASSWORD", by="carol") == 2
    assert await s.list("hello") == []
    with pytest.raises(SecretMissing, match="shipyard secret set hello DB_PASSWORD"):
        await s.current_versions("hello", ["DB_PASSWORD"])
    # What a revision recorded still opens: a rollback restores it.
    assert await s.values("hello", {"DB_PASSWORD": 2}) == {"DB_PASSWORD": "two"}
    with pytest.raises(NotFound):
        await s.remove("hello", "DB_PASSWORD", by="carol")
    assert (await s.set("hello", "DB_PASSWORD", "three", by="dave")).version == 3


async def test_missing_secrets_are_all_named(engine: Engine, tmp_path: Path) -> None:
    s = vault(engine, tmp_path / "shared")
    await s.set("hello", "A", "a", by="alice")
    with pytest.raises(SecretMissing) as caught:
        await s.current_versions("hello", ["A", "C", "B"])
    assert caught.value.detail["missing"] == ["B", "C"]
    assert caught.value.code == "secret_missing"
    with pytest.raises(SecretMissing, match="B version 4"):
        await s.values("hello", {"A": 1, "B": 4})


async def test_the_value_is_sealed_at_rest(
    engine: Engine, database: str | None, tmp_path: Path
) -> None:
    s = vault(engine, tmp_path / "shared")
    await s.set("hello", "DB_PASSWORD", VALUE, by="alice")
    with engine.connect() as conn:
        (sealed,) = conn.execute(text("SELECT sealed FROM app_secrets")).one()
    assert VALUE.encode() not in bytes(sealed)
    if database is None:  # the whole SQLite database (and its WAL) holds no trace of it
        engine.dispose()
        for path in tmp_path.glob("shipyard.db*"):
            assert VALUE.encode() not in path.read_bytes(), path


async def test_another_key_or_a_moved_row_does_not_open(engine: Engine, tmp_path: Path) -> None:
    await vault(engine, tmp_path / "shared").set("hello", "A", VALUE, by="alice")
    other = vault(engine, tmp_path / "elsewhere")  # a new key
    with pytest.raises(SealingError, match="does not open"):
        await other.values("hello", {"A": 1})
    s = vault(engine, tmp_path / "shared")
    await s.set("hello", "B", "b", by="alice")
    with engine.begin() as conn:  # A's sealed value copied onto B's row
        (a,) = conn.execute(text("SELECT sealed FROM app_secrets WHERE name = 'A'")).one()
        conn.execute(update(app_secrets).where(app_secrets.c.name == "B").values(sealed=a))
    with pytest.raises(SealingError):
        await s.values("hello", {"B": 1})


async def test_setting_and_removing_is_audited_without_the_value(
    engine: Engine, tmp_path: Path
) -> None:
    audit = MemoryAuditLog()
    s = AppSecrets(SecretStore(engine), Sealer.for_dir(tmp_path / "shared"), audit)
    await s.set("hello", "DB_PASSWORD", VALUE, by="alice", token_id="t1")
    await s.remove("hello", "DB_PASSWORD", by="bob")
    records = await audit.records()
    assert [(r.event_type, r.service, r.user, dict(r.detail)) for r in records] == [
        ("secret.set", "hello", "alice", {"name": "DB_PASSWORD", "version": 1, "token_id": "t1"}),
        ("secret.removed", "hello", "bob", {"name": "DB_PASSWORD", "version": 1}),
    ]
    assert VALUE not in repr(records)


@pytest.mark.parametrize(
    ("name", "value"),
    [("1ABC", "v"), ("A-B", "v"), ("", "v"), ("OK", ""), ("OK", "a\0b"), ("OK", "x" * 65537)],
    ids=["digit-first", "dash", "empty-name", "empty-value", "nul", "too-big"],
)
async def test_bad_names_and_values_are_refused(
    engine: Engine, tmp_path: Path, name: str, value: str
) -> None:
    s = vault(engine, tmp_path / "shared")
    with pytest.raises(InvalidInput):
        await s.set("hello", name, value, by="alice")
    assert await s.list("hello") == []
