"""The entity store: which hybrid connections exist and which SAS rules apply.

The relay reads entities through :class:`EntityStore` only, so that a database-backed
management plane can replace the in-memory and file implementations here without touching the
request handlers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from hybridrelay.auth.sas import AuthorizationRule, Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig

__all__ = ["EntityStore", "FileEntityStore", "InMemoryEntityStore"]


class EntityStore(Protocol):
    def namespace_rules(self) -> Sequence[AuthorizationRule]: ...

    def get(self, path: str) -> HybridConnectionConfig | None:
        """The hybrid connection at ``path`` (case-insensitive), or None."""
        ...

    def create(self, entity: HybridConnectionConfig) -> None: ...

    def delete(self, path: str) -> bool: ...


class InMemoryEntityStore:
    """Entities held in memory, seeded from the configuration file."""

    def __init__(
        self,
        rules: Sequence[AuthorizationRule] = (),
        entities: Sequence[HybridConnectionConfig] = (),
    ) -> None:
        self._rules = tuple(rules)
        self._entities = {e.name.lower(): e for e in entities}
        #: Keys of the entities created while running (on first listen), not configured.
        self._created: set[str] = set()

    @classmethod
    def from_config(cls, config: RelayConfig) -> InMemoryEntityStore:
        return cls(config.authorization_rules, config.hybrid_connections)

    def namespace_rules(self) -> Sequence[AuthorizationRule]:
        return self._rules

    def replace(
        self, rules: Sequence[AuthorizationRule], entities: Sequence[HybridConnectionConfig]
    ) -> None:
        """Take a new configuration's rules and entities; the entities created while running
        stay unless the new configuration names them."""
        configured = {e.name.strip("/").lower(): e for e in entities}
        kept = {k: e for k, e in self._entities.items() if k in self._created}
        self._created = {k for k in kept if k not in configured}
        self._rules = tuple(rules)
        self._entities = {**{k: kept[k] for k in self._created}, **configured}
        self._changed()

    def get(self, path: str) -> HybridConnectionConfig | None:
        return self._entities.get(path.strip("/").lower())

    def create(self, entity: HybridConnectionConfig) -> None:
        key = entity.name.strip("/").lower()
        if key in self._entities:
            raise ConfigurationError(f"hybrid connection {entity.name!r} already exists")
        self._entities[key] = entity
        self._created.add(key)
        self._changed()

    def delete(self, path: str) -> bool:
        key = path.strip("/").lower()
        self._created.discard(key)
        removed = self._entities.pop(key, None) is not None
        if removed:
            self._changed()
        return removed

    def _changed(self) -> None:
        """Hook for persistent subclasses."""


class FileEntityStore(InMemoryEntityStore):
    """Entities and namespace rules kept in a JSON file (the embedded default's data directory).

    Writes are atomic (write to a temporary file, then rename) and the file is created with
    mode 0600 because it holds keys.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        rules: list[AuthorizationRule] = []
        entities: list[HybridConnectionConfig] = []
        if path.exists():
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                for rule in document.get("authorization_rules", []):
                    rules.append(
                        AuthorizationRule(
                            rule["name"],
                            rule["primary_key"],
                            rule.get("secondary_key"),
                            Rights.parse(rule["rights"]),
                        )
                    )
                for entity in document.get("hybrid_connections", []):
                    entities.append(
                        HybridConnectionConfig(
                            name=entity["name"],
                            requires_client_authorization=bool(
                                entity.get("requires_client_authorization", True)
                            ),
                        )
                    )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigurationError(f"cannot read the entity store {path}: {exc}") from exc
        super().__init__(rules, entities)

    def set_namespace_rules(self, rules: Sequence[AuthorizationRule]) -> None:
        self._rules = tuple(rules)
        self._changed()

    def _changed(self) -> None:
        document = {
            "authorization_rules": [
                {
                    "name": r.name,
                    "primary_key": r.primary_key,
                    "secondary_key": r.secondary_key,
                    "rights": r.rights.names(),
                }
                for r in self._rules
            ],
            "hybrid_connections": [
                {"name": e.name, "requires_client_authorization": e.requires_client_authorization}
                for e in self._entities.values()
            ],
        }
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".store-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
