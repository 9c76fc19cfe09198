"""The management store's interface: what the relay and its management API need of it.

The embedded implementation is SQLite (:mod:`hybridrelay.store.sqlite`); the cluster mode will
add one on Redis. Reads on the data path never touch the backing service: the store keeps the
current :class:`~hybridrelay.store.records.NamespaceState` in memory (``state``) and tells its
subscribers when it changes, so the relay swaps one immutable value per change.

The store holds what the management API created. What the configuration file names is not in
it: the relay lays the file's entities and rules over the store's, and the file wins where both
name the same thing (README, "Operating the relay").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import RelayError
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
)

__all__ = [
    "KeySlot",
    "NotFoundError",
    "Store",
    "StoreError",
    "StoreQuotaError",
    "StoreUnavailableError",
    "Subscriber",
]

KeySlot = Literal["primary", "secondary"]
Subscriber = Callable[[NamespaceState], None]
#: Keep the absent value of an optional field on update (``None`` is a value: "unset").
KEEP: object = object()


class StoreError(RelayError):
    """A management store operation failed."""


class NotFoundError(StoreError):
    """The hybrid connection or rule does not exist."""


class StoreQuotaError(StoreError):
    """A bound of the store was reached (rules per scope, hybrid connections)."""


class StoreUnavailableError(StoreError):
    """The store's backing service cannot be reached or its file cannot be written."""


class Store(Protocol):
    @property
    def state(self) -> NamespaceState:
        """The current state, from memory."""
        ...

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(state)`` after every change; returns the way to unsubscribe."""
        ...

    async def check(self) -> None:
        """Raise :class:`StoreUnavailableError` if the store cannot serve (``/readyz``)."""
        ...

    async def put_hybrid_connection(
        self,
        name: str,
        *,
        requires_client_authorization: bool | None = None,
        user_metadata: str | None | object = KEEP,
        http_response_timeout: float | None | object = KEEP,
    ) -> tuple[HybridConnectionRecord, bool]:
        """Create (with defaults for what is not given) or update (keeping what is not given);
        returns the record and whether it was created."""
        ...

    async def delete_hybrid_connection(self, name: str) -> bool:
        """Delete it and its rules; False when it did not exist."""
        ...

    async def put_rule(
        self, name: str, rights: Rights, *, entity: str = ""
    ) -> tuple[RuleRecord, bool]:
        """Create a rule with new random keys, or change an existing rule's rights (keys
        kept); ``entity`` empty for the namespace. :class:`NotFoundError` for a missing
        entity."""
        ...

    async def delete_rule(self, name: str, *, entity: str = "") -> bool: ...

    async def regenerate_key(
        self, name: str, slot: KeySlot, *, entity: str = "", key: str | None = None
    ) -> RuleRecord:
        """Replace one key (random, or ``key``); the other is kept."""
        ...

    async def update_namespace(self, *, tags: dict[str, str]) -> NamespaceRecord: ...

    async def aclose(self) -> None: ...
