"""The embedded management store (store/sqlite.py) on a real SQLite file."""

from __future__ import annotations

import base64
import sqlite3
import stat
from pathlib import Path

import pytest

from hybridrelay.auth.sas import Rights
from hybridrelay.store.base import MAX_RULES_PER_SCOPE, NotFoundError, StoreError, StoreQuotaError
from hybridrelay.store.records import NamespaceState
from hybridrelay.store.sqlite import MIGRATIONS, SqliteStore

pytestmark = pytest.mark.timeout(30)

ALL = Rights.LISTEN | Rights.SEND | Rights.MANAGE
ROOT = "RootManageSharedAccessKey"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


async def open_store(path: Path, clock: Clock | None = None, **kw: object) -> SqliteStore:
    return await SqliteStore.open(
        path,
        namespace="contoso",
        initial_rules=[(ROOT, ALL)],
        clock=clock or Clock(),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_new_store_is_private_and_has_the_root_rule(tmp_path: Path) -> None:
    path = tmp_path / "data" / "store.db"
    store = await open_store(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        (root,) = store.state.namespace.rules
        assert root.name == ROOT and root.rights == ALL
        assert len(base64.b64decode(root.primary_key)) == 32
        assert root.primary_key != root.secondary_key
        assert root.primary_key not in repr(root) and root.primary_key not in repr(store.state)
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    finally:
        await store.aclose()


async def test_an_existing_file_is_narrowed_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    store = await open_store(path)
    await store.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_changes_persist_and_are_published(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    clock = Clock()
    store = await open_store(path, clock)
    seen: list[NamespaceState] = []
    unsubscribe = store.subscribe(seen.append)
    try:
        record, created = await store.put_hybrid_connection("Plant/Line-1", user_metadata="m")
        assert created and record.requires_client_authorization and record.user_metadata == "m"
        assert store.state.get("plant/line-1") == record
        updated, created = await store.put_hybrid_connection(
            "plant/line-1", requires_client_authorization=False
        )
        assert not created
        assert updated.name == "Plant/Line-1"  # the casing of its creation
        assert updated.created_at == record.created_at and updated.updated_at > record.updated_at
        assert updated.user_metadata == "m"  # omitted: kept
        cleared, _ = await store.put_hybrid_connection("plant/line-1", user_metadata=None)
        assert cleared.user_metadata is None
        rule, created = await store.put_rule("edge", Rights.LISTEN, entity="plant/line-1")
        assert created and rule.entity == "plant/line-1"
        changed, created = await store.put_rule(
            "EDGE", Rights.LISTEN | Rights.SEND, entity="Plant/line-1"
        )
        assert not created and changed.primary_key == rule.primary_key
        rotated = await store.regenerate_key("edge", "secondary", entity="plant/line-1")
        assert rotated.primary_key == rule.primary_key
        assert rotated.secondary_key != rule.secondary_key
        given = await store.regenerate_key("edge", "primary", entity="plant/line-1", key="k" * 40)
        assert given.primary_key == "k" * 40
        await store.update_namespace(tags={"site": "a"})
        assert [state.version for state in seen] == list(range(1, 9))
        assert seen[-1] is store.state
        unsubscribe()
        await store.put_hybrid_connection("other")
        assert len(seen) == 8
        before = store.state
    finally:
        await store.aclose()
    reopened = await open_store(path)
    try:
        state = reopened.state
        assert state.namespace.tags == {"site": "a"}
        assert state.namespace.rules == before.namespace.rules
        assert dict(state.hybrid_connections) == dict(before.hybrid_connections)
        (edge,) = state.get("plant/line-1").rules  # type: ignore[union-attr]
        assert edge.primary_key == "k" * 40 and edge.rights == Rights.LISTEN | Rights.SEND
    finally:
        await reopened.aclose()


async def test_deletes(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "store.db")
    try:
        await store.put_hybrid_connection("hc")
        await store.put_rule("edge", Rights.SEND, entity="hc")
        assert await store.delete_rule("EDGE", entity="hc")
        assert not await store.delete_rule("edge", entity="hc")
        await store.put_rule("edge", Rights.SEND, entity="hc")
        assert await store.delete_hybrid_connection("HC")
        assert store.state.get("hc") is None
        assert not await store.delete_hybrid_connection("hc")
        # A new entity of the same name does not inherit the old one's rules.
        await store.put_hybrid_connection("hc")
        assert store.state.get("hc").rules == ()  # type: ignore[union-attr]
        with pytest.raises(NotFoundError):
            await store.put_rule("edge", Rights.SEND, entity="missing")
        with pytest.raises(NotFoundError):
            await store.regenerate_key("nobody", "primary")
        assert await store.delete_rule(ROOT)
        assert store.state.namespace.rules == ()
    finally:
        await store.aclose()


async def test_bounds(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "store.db", max_hybrid_connections=2)
    try:
        for index in range(MAX_RULES_PER_SCOPE - 1):
            await store.put_rule(f"rule-{index}", Rights.SEND)
        with pytest.raises(StoreQuotaError):
            await store.put_rule("one-too-many", Rights.SEND)
        await store.put_rule("rule-0", Rights.LISTEN)  # an update is not a new rule
        await store.put_hybrid_connection("a")
        await store.put_hybrid_connection("b")
        with pytest.raises(StoreQuotaError):
            await store.put_hybrid_connection("c")
        await store.put_hybrid_connection("a", user_metadata="x")
    finally:
        await store.aclose()


async def test_migrations(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = await open_store(path)
    await store.put_hybrid_connection("hc")
    await store.aclose()
    # A later schema: the migration runs once, at open, and keeps the data.
    later = (*MIGRATIONS, "ALTER TABLE hybrid_connections ADD COLUMN note TEXT")
    upgraded = await open_store(path, migrations=later)
    assert upgraded.state.get("hc") is not None
    await upgraded.aclose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(later),)
        columns = [row[1] for row in db.execute("PRAGMA table_info(hybrid_connections)")]
        assert "note" in columns
    # A file from a newer hybridrelay is refused, not misread.
    with pytest.raises(StoreError, match="newer than this hybridrelay"):
        await open_store(path)


async def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = await open_store(path)
    await store.aclose()
    broken = (*MIGRATIONS, "ALTER TABLE hybrid_connections ADD COLUMN x TEXT; NOT SQL")
    with pytest.raises(StoreError):
        await open_store(path, migrations=broken)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        columns = [row[1] for row in db.execute("PRAGMA table_info(hybrid_connections)")]
        assert "x" not in columns
