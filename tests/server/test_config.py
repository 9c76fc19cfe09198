"""Relay configuration: every example parses, mistakes are named precisely."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server import RelayConfig

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("relay*.yaml"))
KEY = "0123456789abcdef0123456789abcdef"


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


def with_keys(path: Path, tmp_path: Path) -> Path:
    """The example with its REPLACE-ME placeholders replaced by keys, as its header asks."""
    text = re.sub(r'"REPLACE-ME-[^"]*"', lambda _: f'"{"k" * 44}"', path.read_text("utf-8"))
    copy = tmp_path / path.name
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_relay_example_parses(path: Path, tmp_path: Path) -> None:
    config = RelayConfig.load(with_keys(path, tmp_path))
    assert config.hybrid_connections
    assert all(rule.rights for rule in config.authorization_rules)


def test_full_example_values(tmp_path: Path) -> None:
    config = RelayConfig.load(with_keys(EXAMPLES_DIR / "relay.yaml", tmp_path))
    assert config.server.tls is not None and config.server.port == 9400
    # Commented out, so the example works locally as shipped (tests/test_examples.py).
    assert config.server.public_base_url is None and config.namespace_host is None
    orders = config.hybrid_connections[0]
    assert [r.name for r in orders.authorization_rules] == ["orders-edge", "orders-devices"]
    assert orders.authorization_rules[0].rights == Rights.LISTEN
    webhooks = config.hybrid_connections[2]
    assert not webhooks.requires_client_authorization and webhooks.http_response_timeout == 120
    (plc,) = config.ingress
    assert (plc.host, plc.port, plc.hybrid_connection) == ("0.0.0.0", 5020, "plant/line-1/plc")
    assert plc.allows("198.51.100.7") and not plc.allows("192.0.2.1")
    assert "REPLACE-ME" not in repr(config)


def rule(**changes: Any) -> dict[str, Any]:
    return {"name": "r", "primary_key": KEY, "rights": ["Send"], **changes}


def base(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "server": {"plaintext": True},
        "namespace": {
            "authorization_rules": [{"name": "r", "primary_key": KEY, "rights": ["Listen"]}],
            "hybrid_connections": [{"name": "hc"}],
        },
    }
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (base(extra=1), "unknown key(s): extra"),
        (base(server={"plaintext": True, "prot": 1}), "server.prot"),
        (base(server={}), "no 'tls' section"),
        (base(server={"plaintext": True, "port": 70000}), "server.port"),
        (base(server={"plaintext": True, "port": "80"}), "server.port"),
        (base(server={"tls": {"cert": "c.pem"}}), "server.tls.key: required"),
        (base(limits={"rendezvous_timeout": "soon"}), "limits.rendezvous_timeout"),
        (
            base(namespace={"hybrid_connections": [{"name": "hc"}, {"name": "HC"}]}),
            "duplicate name",
        ),
        (base(namespace={"hybrid_connections": [{"name": "a//b"}]}), "invalid entity path"),
        (base(namespace={"hybrid_connections": [{"nam": "x"}]}), "hybrid_connections[0].nam"),
        (
            base(
                namespace={
                    "authorization_rules": [{"name": "r", "primary_key": KEY, "rights": ["Read"]}]
                }
            ),
            "unknown right",
        ),
        (
            base(
                namespace={
                    "authorization_rules": [
                        {"name": "r", "primary_key": "short", "rights": ["Send"]}
                    ]
                }
            ),
            "5 characters, a key needs at least 32",
        ),
        (base(namespace={"authorization_rules": {"name": "r"}}), "expected a list"),
        ({"server": []}, "expected a mapping"),
    ],
)
def test_mistakes_are_named(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        RelayConfig.from_dict(document)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        RelayConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="bad.yaml, line 1: "):
        RelayConfig.load(bad)
    relative = tmp_path / "rel.yaml"
    relative.write_text("server: {tls: {cert: c.pem, key: k.pem}}\n", encoding="utf-8")
    config = RelayConfig.load(relative)
    assert config.server.tls is not None and config.server.tls.cert == str(tmp_path / "c.pem")
