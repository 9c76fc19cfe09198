"""The embedded management store: one SQLite file, no external service.

* The file is created with mode 0600 (it holds keys), and an existing one is narrowed to 0600.
* ``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS` brings an older file up to
  date in one transaction at open, and a file written by a newer hybridrelay is refused rather
  than misread.
* Every statement runs on one worker thread (sqlite3 objects stay on the thread that made
  them, and the event loop never waits on the disk); writes are serialised by that thread.
* The state is read once at open and then kept in memory: each committed change replaces the
  one record it touched in a new :class:`NamespaceState` and tells the subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from hybridrelay.auth.sas import Rights
from hybridrelay.protocol.arm import new_key
from hybridrelay.store.base import (
    KEEP,
    KeySlot,
    NotFoundError,
    StateKeeper,
    StoreError,
    StoreUnavailableError,
    find_rule,
    put_hybrid_connection_record,
    put_rule_record,
    regenerated_rule,
    swap_rule,
)
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
    entity_key,
)

__all__ = ["MEMORY", "MIGRATIONS", "SqliteStore"]

logger = logging.getLogger("hybridrelay.store")

#: The path of a store kept in memory only (a relay built in code without ``store.path``).
MEMORY = ":memory:"
#: How long a statement waits for a lock held by another process on the same file.
_BUSY_TIMEOUT_MS = 5000

#: Schema migrations: entry N brings a file from version N to N + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE namespace (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        tags TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE hybrid_connections (
        key TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        requires_client_authorization INTEGER NOT NULL,
        user_metadata TEXT,
        http_response_timeout REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE rules (
        entity_key TEXT NOT NULL,
        key TEXT NOT NULL,
        name TEXT NOT NULL,
        primary_key TEXT NOT NULL,
        secondary_key TEXT NOT NULL,
        rights TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (entity_key, key)
    );
    """,
)

T = TypeVar("T")


def _rights_text(rights: Rights) -> str:
    return ",".join(rights.names())


def _rights(text: str) -> Rights:
    return Rights.parse(name for name in text.split(",") if name)


def _open_private(path: Path) -> None:
    """Create the file with mode 0600 if it is missing, and narrow it to 0600 if not: the
    mode is set before SQLite writes a key into it. SQLite gives its journal the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SqliteStore(StateKeeper):
    """The management store in a SQLite file. Open it with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        state: NamespaceState,
        *,
        clock: Callable[[], float],
        max_hybrid_connections: int,
    ) -> None:
        super().__init__(state)
        self._path = path
        self._db = connection
        self._executor = executor
        self._clock = clock
        self._max_hybrid_connections = max_hybrid_connections

    def __repr__(self) -> str:
        return f"<SqliteStore {str(self._path)!r} version={self._state.version}>"

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        namespace: str,
        initial_rules: Sequence[tuple[str, Rights]] = (),
        clock: Callable[[], float] = time.time,
        max_hybrid_connections: int = 10_000,
        migrations: Sequence[str] = MIGRATIONS,
    ) -> SqliteStore:
        """Open (or create) the store at ``path``.

        A new file gets the namespace ``namespace`` and ``initial_rules`` with fresh keys (the
        embedded default passes ``RootManageSharedAccessKey`` with every right).
        """
        file = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridrelay-store")
        loop = asyncio.get_running_loop()

        def start() -> tuple[sqlite3.Connection, NamespaceState]:
            if str(file) != MEMORY:
                _open_private(file)
            db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
            try:
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                _migrate(db, migrations, file)
                _ensure_namespace(db, namespace, initial_rules, clock())
                return db, _load(db)
            except BaseException:
                db.close()
                raise

        try:
            db, state = await loop.run_in_executor(executor, start)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailableError(f"cannot open the store {file}: {exc}") from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(
            file,
            db,
            executor,
            state,
            clock=clock,
            max_hybrid_connections=max_hybrid_connections,
        )

    # -- reading --------------------------------------------------------------------------------

    async def check(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    # -- writing --------------------------------------------------------------------------------

    async def put_hybrid_connection(
        self,
        name: str,
        *,
        requires_client_authorization: bool | None = None,
        user_metadata: str | None | object = KEEP,
        http_response_timeout: float | None | object = KEEP,
    ) -> tuple[HybridConnectionRecord, bool]:
        key = entity_key(name)
        old = self._state.hybrid_connections.get(key)
        record = put_hybrid_connection_record(
            old,
            name,
            self._clock(),
            count=len(self._state.hybrid_connections),
            limit=self._max_hybrid_connections,
            requires_client_authorization=requires_client_authorization,
            user_metadata=user_metadata,
            http_response_timeout=http_response_timeout,
        )

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO hybrid_connections VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET requires_client_authorization = "
                "excluded.requires_client_authorization, user_metadata = excluded.user_metadata,"
                " http_response_timeout = excluded.http_response_timeout,"
                " updated_at = excluded.updated_at",
                (
                    key,
                    record.name,
                    int(record.requires_client_authorization),
                    record.user_metadata,
                    record.http_response_timeout,
                    record.created_at,
                    record.updated_at,
                ),
            )

        await self._write(write)
        self._publish_change(entities={**self._state.hybrid_connections, key: record})
        return record, old is None

    async def delete_hybrid_connection(self, name: str) -> bool:
        key = entity_key(name)
        if key not in self._state.hybrid_connections:
            return False

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM rules WHERE entity_key = ?", (key,))
            db.execute("DELETE FROM hybrid_connections WHERE key = ?", (key,))

        await self._write(write)
        entities = dict(self._state.hybrid_connections)
        del entities[key]
        self._publish_change(entities=entities)
        return True

    async def put_rule(
        self, name: str, rights: Rights, *, entity: str = ""
    ) -> tuple[RuleRecord, bool]:
        record, created = put_rule_record(
            self._rules_of(entity), name, rights, self._clock(), entity_key(entity)
        )
        await self._write(lambda db: _upsert_rule(db, record))
        self._replace_rule(record)
        return record, created

    async def delete_rule(self, name: str, *, entity: str = "") -> bool:
        if find_rule(self._rules_of(entity), name) is None:
            return False
        scope = entity_key(entity)
        await self._write(
            lambda db: db.execute(
                "DELETE FROM rules WHERE entity_key = ? AND key = ?", (scope, name.lower())
            )
        )
        self._replace_rule(None, scope=scope, name=name)
        return True

    async def regenerate_key(
        self, name: str, slot: KeySlot, *, entity: str = "", key: str | None = None
    ) -> RuleRecord:
        record = regenerated_rule(self._rules_of(entity), name, slot, key, self._clock())
        await self._write(lambda db: _upsert_rule(db, record))
        self._replace_rule(record)
        return record

    async def update_namespace(self, *, tags: dict[str, str]) -> NamespaceRecord:
        namespace = replace(
            self._state.namespace, tags=MappingProxyType(dict(tags)), updated_at=self._clock()
        )
        await self._write(
            lambda db: db.execute(
                "UPDATE namespace SET tags = ?, updated_at = ? WHERE id = 1",
                (json.dumps(dict(namespace.tags)), namespace.updated_at),
            )
        )
        self._publish_change(namespace=namespace)
        return namespace

    async def aclose(self) -> None:
        with contextlib.suppress(sqlite3.Error, RuntimeError):
            await self._run(lambda db: db.close())
        self._executor.shutdown(wait=False)

    # -- internals ------------------------------------------------------------------------------

    def _rules_of(self, entity: str) -> tuple[RuleRecord, ...]:
        if not entity_key(entity):
            return self._state.namespace.rules
        record = self._state.get(entity)
        if record is None:
            raise NotFoundError(f"no hybrid connection {entity.strip('/')!r}")
        return record.rules

    def _replace_rule(self, record: RuleRecord | None, *, scope: str = "", name: str = "") -> None:
        """Publish the state with ``record`` in its scope (or the rule ``name`` of ``scope``
        removed when ``record`` is None)."""
        if record is not None:
            scope, name = record.entity, record.name
        if not scope:
            namespace = self._state.namespace
            rules = swap_rule(namespace.rules, name, record)
            self._publish_change(namespace=replace(namespace, rules=rules))
            return
        entity = self._state.hybrid_connections[scope]
        entities = {
            **self._state.hybrid_connections,
            scope: replace(entity, rules=swap_rule(entity.rules, name, record)),
        }
        self._publish_change(entities=entities)

    def _publish_change(
        self,
        *,
        namespace: NamespaceRecord | None = None,
        entities: dict[str, HybridConnectionRecord] | None = None,
    ) -> None:
        old = self._state
        self._publish(
            NamespaceState(
                namespace=namespace or old.namespace,
                hybrid_connections=MappingProxyType(entities)
                if entities is not None
                else old.hybrid_connections,
                version=old.version + 1,
            )
        )

    async def _write(self, statements: Callable[[sqlite3.Connection], object]) -> None:
        await self._run(lambda db: _transaction(db, statements))

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, job, self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the store {self._path} failed: {exc}") from exc


def _migrate(db: sqlite3.Connection, migrations: Sequence[str], file: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(migrations):
        raise StoreError(
            f"the store {file} has schema version {version}, newer than this hybridrelay "
            f"knows ({len(migrations)}): upgrade hybridrelay, or restore a backup"
        )
    if version == len(migrations):
        return

    def migrate(db: sqlite3.Connection) -> None:
        for number in range(version, len(migrations)):
            for statement in _statements(migrations[number]):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {len(migrations)}")

    _transaction(db, migrate)
    logger.info("store %s: schema %d -> %d", file, version, len(migrations))


def _statements(script: str) -> list[str]:
    # executescript() commits first; these run inside the migration's own transaction.
    return [statement.strip() for statement in script.split(";") if statement.strip()]


def _ensure_namespace(
    db: sqlite3.Connection, name: str, initial_rules: Sequence[tuple[str, Rights]], now: float
) -> None:
    if db.execute("SELECT 1 FROM namespace").fetchone() is not None:
        return

    def create(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO namespace VALUES (1, ?, '{}', ?, ?)", (name, now, now))
        for rule_name, rights in initial_rules:
            _upsert_rule(db, RuleRecord(rule_name, new_key(), new_key(), rights, now, now))

    _transaction(db, create)


def _transaction(
    db: sqlite3.Connection, statements: Callable[[sqlite3.Connection], object]
) -> None:
    """Run ``statements(db)`` in one write transaction (rolled back if they raise)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        statements(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _upsert_rule(db: sqlite3.Connection, rule: RuleRecord) -> None:
    db.execute(
        "INSERT INTO rules VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (entity_key, key) DO "
        "UPDATE SET primary_key = excluded.primary_key, secondary_key = excluded.secondary_key,"
        " rights = excluded.rights, updated_at = excluded.updated_at",
        (
            rule.entity,
            rule.name.lower(),
            rule.name,
            rule.primary_key,
            rule.secondary_key,
            _rights_text(rule.rights),
            rule.created_at,
            rule.updated_at,
        ),
    )


def _load(db: sqlite3.Connection) -> NamespaceState:
    rules: dict[str, list[RuleRecord]] = {}
    for row in db.execute(
        "SELECT entity_key, name, primary_key, secondary_key, rights, created_at, updated_at "
        "FROM rules ORDER BY entity_key, key"
    ):
        scope, name, primary, secondary, rights, created, updated = row
        rules.setdefault(scope, []).append(
            RuleRecord(name, primary, secondary, _rights(rights), created, updated, scope)
        )
    name, tags, created, updated = db.execute(
        "SELECT name, tags, created_at, updated_at FROM namespace"
    ).fetchone()
    namespace = NamespaceRecord(
        name, created, updated, MappingProxyType(json.loads(tags)), tuple(rules.get("", ()))
    )
    entities: dict[str, HybridConnectionRecord] = {}
    for row in db.execute(
        "SELECT key, name, requires_client_authorization, user_metadata, http_response_timeout,"
        " created_at, updated_at FROM hybrid_connections"
    ):
        key, entity_name, requires, metadata, timeout, created, updated = row
        entities[key] = HybridConnectionRecord(
            entity_name,
            bool(requires),
            created,
            updated,
            metadata,
            timeout,
            tuple(rules.get(key, ())),
        )
    return NamespaceState(namespace, MappingProxyType(entities), version=0)
