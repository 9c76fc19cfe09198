"""The embedded default relay's data directory: its management store and where it listens.

``hybridrelay serve`` without ``--config`` keeps everything in one directory
(``--data-dir``, ``$HYBRIDRELAY_DATA_DIR``, else ``~/.local/share/hybridrelay``):

* ``relay.db``: the management store (SQLite, mode 0600) with the root rule
  ``RootManageSharedAccessKey`` (Listen, Send, Manage; keys from the OS's random source) and the
  hybrid connections created on first listen or through the management API;
* ``endpoint``: the data and management addresses of the relay running now, written at start.

``hybridrelay connection-string`` reads the keys from the store the running relay writes
through (a regenerated key shows at once) and asks the relay's ``/healthz`` whether it runs.
Directories of earlier versions kept the namespace in ``namespace.json``; its rules and hybrid
connections are moved into the store the first time it is opened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.store.base import find_rule
from hybridrelay.store.records import RuleRecord
from hybridrelay.store.sqlite import SqliteStore

__all__ = [
    "ROOT_RULE",
    "Endpoints",
    "default_data_dir",
    "open_store",
    "read_endpoints",
    "read_key",
    "write_endpoints",
]

logger = logging.getLogger("hybridrelay.cli")

ROOT_RULE = "RootManageSharedAccessKey"
STORE_FILE = "relay.db"
_LEGACY_FILE = "namespace.json"
_ENDPOINT_FILE = "endpoint"
_ALL_RIGHTS = Rights.LISTEN | Rights.SEND | Rights.MANAGE


def default_data_dir() -> Path:
    explicit = os.environ.get("HYBRIDRELAY_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hybridrelay"


async def open_store(data_dir: Path, *, namespace: str = "hybridrelay") -> SqliteStore:
    """The data directory's store, created with the root rule if it is new."""
    path = data_dir / STORE_FILE
    new = not path.exists()
    legacy = data_dir / _LEGACY_FILE
    store = await SqliteStore.open(
        path,
        namespace=namespace,
        initial_rules=[] if new and legacy.exists() else [(ROOT_RULE, _ALL_RIGHTS)],
    )
    if new and legacy.exists():
        await _import_legacy(store, legacy)
    return store


_LegacyRule = tuple[str, str, str | None, Rights]


def _read_legacy(legacy: Path) -> tuple[list[_LegacyRule], list[tuple[str, bool]]]:
    try:
        document = json.loads(legacy.read_text(encoding="utf-8"))
        rules = [
            (r["name"], r["primary_key"], r.get("secondary_key"), Rights.parse(r["rights"]))
            for r in document.get("authorization_rules", [])
        ]
        entities = [
            (e["name"], bool(e.get("requires_client_authorization", True)))
            for e in document.get("hybrid_connections", [])
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"cannot read {legacy}: {exc}") from exc
    return rules, entities


async def _import_legacy(store: SqliteStore, legacy: Path) -> None:
    """Move an earlier version's ``namespace.json`` into the store, keys unchanged."""
    rules, entities = _read_legacy(legacy)
    for name, primary, secondary, rights in rules:
        await store.put_rule(name, rights)
        await store.regenerate_key(name, "primary", key=primary)
        if secondary:
            await store.regenerate_key(name, "secondary", key=secondary)
    if not any(name == ROOT_RULE for name, *_ in rules):
        await store.put_rule(ROOT_RULE, _ALL_RIGHTS)
    for name, requires_client_authorization in entities:
        await store.put_hybrid_connection(
            name, requires_client_authorization=requires_client_authorization
        )
    os.replace(legacy, legacy.with_suffix(".json.imported"))
    logger.info("moved %s into %s", legacy, STORE_FILE)


def read_key(data_dir: Path, rule: str = ROOT_RULE, *, secondary: bool = False) -> str:
    """A namespace rule's primary (or secondary) key, from the data directory's store."""

    async def read() -> RuleRecord | None:
        store = await open_store(data_dir)
        try:
            return find_rule(store.state.namespace.rules, rule)
        finally:
            await store.aclose()

    found = asyncio.run(read())
    if found is None:
        raise ConfigurationError(
            f"the store has no namespace rule {rule!r}: list them with `hybridrelay admin rules "
            "list`"
        )
    return found.secondary_key if secondary else found.primary_key


@dataclass(frozen=True)
class Endpoints:
    """Where the embedded relay listens: its data base URL and its management URL."""

    relay: str
    management: str | None


def write_endpoints(data_dir: Path, endpoints: Endpoints) -> None:
    document = {"relay": endpoints.relay, "management": endpoints.management}
    (data_dir / _ENDPOINT_FILE).write_text(json.dumps(document) + "\n", encoding="utf-8")


def read_endpoints(data_dir: Path) -> Endpoints | None:
    """What the relay last started in ``data_dir`` wrote; None if it never started."""
    try:
        text = (data_dir / _ENDPOINT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    try:
        document = json.loads(text)
        return Endpoints(str(document["relay"]), document.get("management"))
    except (ValueError, KeyError, TypeError):
        return Endpoints(text, None)  # an earlier version wrote the base URL alone


def is_running(endpoints: Endpoints, timeout: float = 2.0) -> bool:
    """Whether the relay answers ``/healthz`` on its management listener."""
    if endpoints.management is None:
        return False
    try:
        with urllib.request.urlopen(endpoints.management + "/healthz", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False
