"""The embedded management store: one SQLite file, no external service.

* The file is created with mode 0600 (it holds keys), and an existing one is narrowed to 0600.
* ``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS` brings an older file up to
  date in one transaction at open, and a file written by a newer hybridrelay is refused rather
  than misread.
* Every statement runs on one worker thread (sqlite3 objects stay on the thread that made
  them, and the event loop never waits on the disk); writes are serialised by that thread.
* The state is read once at open and then kept in memory: each committed change (one at a
  time) replaces the one record it touched, with its rules, in a new :class:`NamespaceState`
  and tells the subscribers.
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
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from hybridrelay.auth.sas import Rights
from hybridrelay.protocol.arm import new_key
from hybridrelay.store.base import (
    EntityChange,
    NamespaceChange,
    Store,
    StoreError,
    StoreUnavailableError,
)
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
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


class SqliteStore(Store):
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
        super().__init__(state, clock=clock, max_hybrid_connections=max_hybrid_connections)
        self._path = path
        self._db = connection
        self._executor = executor
        #: One change at a time: each reads the state the one before left.
        self._changing = asyncio.Lock()

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

    async def check(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        with contextlib.suppress(sqlite3.Error, RuntimeError):
            await self._run(lambda db: db.close())
        self._executor.shutdown(wait=False)

    # -- the two steps of a change ----------------------------------------------------------

    async def _change_namespace(self, change: NamespaceChange) -> NamespaceRecord:
        async with self._changing:
            old = self._state
            namespace = change(old.namespace)
            if namespace != old.namespace:
                await self._write(lambda db: _write_namespace(db, namespace))
                self._publish(NamespaceState(namespace, old.hybrid_connections, old.version + 1))
            return namespace

    async def _change_entity(self, key: str, change: EntityChange) -> HybridConnectionRecord | None:
        async with self._changing:
            old = self._state
            record = change(old.hybrid_connections.get(key))
            if record == old.hybrid_connections.get(key):
                return record
            await self._write(lambda db: _write_entity(db, key, record))
            entities = dict(old.hybrid_connections)
            if record is None:
                del entities[key]
            else:
                entities[key] = record
            self._publish(
                NamespaceState(old.namespace, MappingProxyType(entities), old.version + 1)
            )
            return record

    async def _write(self, statements: Callable[[sqlite3.Connection], object]) -> None:
        await self._run(lambda db: _transaction(db, statements))

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, job, self._db)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"the store {self._path} failed: {exc}") from exc


def _write_namespace(db: sqlite3.Connection, namespace: NamespaceRecord) -> None:
    db.execute(
        "UPDATE namespace SET tags = ?, updated_at = ? WHERE id = 1",
        (json.dumps(dict(namespace.tags)), namespace.updated_at),
    )
    _write_rules(db, "", namespace.rules)


def _write_entity(db: sqlite3.Connection, key: str, record: HybridConnectionRecord | None) -> None:
    """Keep ``record`` as the hybrid connection ``key``, with its rules (None: delete both)."""
    _write_rules(db, key, () if record is None else record.rules)
    if record is None:
        db.execute("DELETE FROM hybrid_connections WHERE key = ?", (key,))
        return
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


def _write_rules(db: sqlite3.Connection, scope: str, rules: Sequence[RuleRecord]) -> None:
    """Make ``rules`` the rules of ``scope`` (an entity key; "" for the namespace)."""
    db.execute("DELETE FROM rules WHERE entity_key = ?", (scope,))
    for rule in rules:
        _upsert_rule(db, rule)


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
