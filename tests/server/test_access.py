"""The relay's authorization check remembers the decisions that allowed (server/access.py):
a remembered decision is used only while it would be made again."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from hybridrelay.auth.sas import AuthorizationRule, Rights, create_token, token_audience
from hybridrelay.server.access import Access
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig

HOST = "relay.example:9400"
KEY = "k" * 44
OTHER_KEY = "o" * 44


class Rules:
    """The part of the store Access reads: the namespace's rules (a tuple, replaced)."""

    def __init__(self) -> None:
        self.rules: tuple[AuthorizationRule, ...] = ()

    def namespace_rules(self) -> Sequence[AuthorizationRule]:
        return self.rules


def config(**namespace: object) -> RelayConfig:
    return RelayConfig.from_dict(
        {"server": {"plaintext": True}, "namespace": {"hybrid_connections": [], **namespace}}
    )


def token(key: str = KEY, expiry: float | None = None) -> str:
    when = int(expiry if expiry is not None else time.time() + 3600)
    return create_token(token_audience(HOST, "hc"), "edge", key, expiry=when)


def setup() -> tuple[Access, Rules, list[RelayConfig], HybridConnectionConfig]:
    store = Rules()
    settings = [config()]
    entity = HybridConnectionConfig(
        name="hc", authorization_rules=(AuthorizationRule("edge", KEY, rights=Rights.SEND),)
    )
    return Access(store, lambda: settings[0]), store, settings, entity  # type: ignore[arg-type]


def test_a_remembered_decision_is_the_same() -> None:
    access, _, _, entity = setup()
    first = access.authorize(token(), entity, Rights.SEND, host=HOST)
    again = access.authorize(token(), entity, Rights.SEND, host=HOST)
    assert first.allowed and again.allowed
    assert (again.status, again.rule_name, again.expiry) == (200, "edge", first.expiry)
    # Another right, path or host is decided on its own.
    assert access.authorize(token(), entity, Rights.LISTEN, host=HOST).status == 403
    assert access.authorize(token(), entity, Rights.SEND, suffix="/x", host=HOST).allowed
    assert access.authorize(token(), entity, Rights.SEND, host="other.example").status == 403


def test_a_rotated_key_is_refused_at_once() -> None:
    access, _, _, entity = setup()
    old = token()
    assert access.authorize(old, entity, Rights.SEND, host=HOST).allowed
    rotated = dataclasses.replace(
        entity, authorization_rules=(AuthorizationRule("edge", OTHER_KEY, rights=Rights.SEND),)
    )
    assert access.authorize(old, rotated, Rights.SEND, host=HOST).status == 401
    assert access.authorize(token(OTHER_KEY), rotated, Rights.SEND, host=HOST).allowed


def test_a_changed_namespace_rule_or_configuration_is_decided_anew() -> None:
    access, store, settings, _ = setup()
    bare = HybridConnectionConfig(name="hc")
    store.rules = (AuthorizationRule("edge", KEY, rights=Rights.SEND),)
    assert access.authorize(token(), bare, Rights.SEND, host=HOST).allowed
    store.rules = (AuthorizationRule("edge", KEY, rights=Rights.LISTEN),)
    assert access.authorize(token(), bare, Rights.SEND, host=HOST).status == 403
    store.rules = (AuthorizationRule("edge", KEY, rights=Rights.SEND),)
    assert access.authorize(token(), bare, Rights.SEND, host=HOST).allowed
    # The namespace now names its one host: the token's audience is another one.
    settings[0] = config(host="elsewhere.example")
    assert access.authorize(token(), bare, Rights.SEND, host=HOST).status == 403


def test_an_expired_token_is_refused_though_it_was_allowed() -> None:
    access, _, _, entity = setup()
    soon = token(expiry=time.time() + 1)
    assert access.authorize(soon, entity, Rights.SEND, host=HOST).allowed
    time.sleep(2.1)  # the token's expiry is in whole seconds
    assert access.authorize(soon, entity, Rights.SEND, host=HOST).status == 401
    # ... unless within a grace the caller gives (a renewal).
    assert access.authorize(soon, entity, Rights.SEND, 60, host=HOST).allowed
