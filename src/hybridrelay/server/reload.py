"""What a configuration reload (SIGHUP) may change in a running relay, and what it changed.

Entities, rules, limits, the namespace's host, ``auto_create_hybrid_connections`` and the
server's ``public_base_url`` and ``shutdown_grace_period`` are read where they are used, so
they change live (:meth:`~hybridrelay.server.app.RelayServer.replace_config`); the certificate
is swapped for new handshakes (``certificate.py``). Bound ports, hosts, plain text versus TLS,
the management listener, the store and the ingress ports were set up at start: a reload keeps
the running ones and says they need a restart.

Descriptions name entities, rules and settings, never a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from hybridrelay.auth.sas import AuthorizationRule
from hybridrelay.server.config import RelayConfig, ServerSettings

__all__ = ["LIVE_SERVER_FIELDS", "describe_changes", "restart_only", "without_restart_only"]

#: ``server`` fields a running relay takes over (``tls`` only between two certificates).
LIVE_SERVER_FIELDS = ("tls", "public_base_url", "shutdown_grace_period")
#: Whole parts of the configuration that are set up at start.
_RESTART_SECTIONS = ("management", "store", "ingress", "namespace_name")
_KEYS = {"namespace_name": "namespace.name"}


def _server_restart_only(old: ServerSettings, new: ServerSettings) -> list[str]:
    changed = [
        f"server.{f.name}"
        for f in fields(ServerSettings)
        if f.name not in LIVE_SERVER_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    ]
    if (old.tls is None) != (new.tls is None) and "server.plaintext" not in changed:
        changed.append("server.tls")
    return changed


def restart_only(old: RelayConfig, new: RelayConfig) -> list[str]:
    """The keys of ``new`` that differ from ``old`` and take a restart."""
    changed = _server_restart_only(old.server, new.server)
    for name in _RESTART_SECTIONS:
        if getattr(old, name) != getattr(new, name):
            changed.append(_KEYS.get(name, name))
    return changed


def without_restart_only(old: RelayConfig, new: RelayConfig) -> RelayConfig:
    """``new`` with what takes a restart as ``old`` has it (what a reload applies).

    Raises:
        ConfigurationError: the mix does not hold together (an ingress port's hybrid connection
            removed, say).
    """
    server = old.server
    if (old.server.tls is None) == (new.server.tls is None):
        server = replace(server, **{name: getattr(new.server, name) for name in LIVE_SERVER_FIELDS})
    else:
        server = replace(
            server,
            public_base_url=new.server.public_base_url,
            shutdown_grace_period=new.server.shutdown_grace_period,
        )
    return replace(new, server=server, **{name: getattr(old, name) for name in _RESTART_SECTIONS})


def _counted(count: int, what: str, verb: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'} {verb}"


def _named_changes(
    old: Sequence[Any], new: Sequence[Any], what: str, key: Any = lambda item: item.name.lower()
) -> list[str]:
    """``2 hybrid connections added (a, b)``, ``1 ... removed (c)``, ``1 ... changed (d)``."""
    before = {key(item): item for item in old}
    after = {key(item): item for item in new}
    parts = []
    for verb, names in (
        ("added", [after[k].name for k in after if k not in before]),
        ("removed", [before[k].name for k in before if k not in after]),
        ("changed", [after[k].name for k in after if k in before and after[k] != before[k]]),
    ):
        if names:
            parts.append(f"{_counted(len(names), what, verb)} ({', '.join(sorted(names))})")
    return parts


def _rule_changes(
    old: Sequence[AuthorizationRule], new: Sequence[AuthorizationRule], scope: str
) -> list[str]:
    # Rules compare by name, rights and keys; only the name is ever written out.
    return _named_changes(old, new, f"{scope} rule", key=lambda rule: rule.name)


def describe_changes(old: RelayConfig, new: RelayConfig) -> list[str]:
    """What a reload from ``old`` to ``new`` changes, one short phrase each (no secrets)."""
    parts = _named_changes(old.hybrid_connections, new.hybrid_connections, "hybrid connection")
    parts += _rule_changes(old.authorization_rules, new.authorization_rules, "namespace")
    limits = [
        f"{f.name} {getattr(old.limits, f.name)} -> {getattr(new.limits, f.name)}"
        for f in fields(old.limits)
        if getattr(old.limits, f.name) != getattr(new.limits, f.name)
    ]
    if limits:
        parts.append("limits changed: " + ", ".join(limits))
    for name, key in (
        ("namespace_host", "namespace.host"),
        ("auto_create_hybrid_connections", "namespace.auto_create_hybrid_connections"),
    ):
        if getattr(old, name) != getattr(new, name):
            parts.append(f"{key} {getattr(old, name)} -> {getattr(new, name)}")
    for name in ("public_base_url", "shutdown_grace_period"):
        before, after = getattr(old.server, name), getattr(new.server, name)
        if before != after:
            parts.append(f"server.{name} {before} -> {after}")
    return parts
