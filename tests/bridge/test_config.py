"""The YAML configuration and its merge with the command line."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from hybridrelay.bridge.config import (
    BridgeConfig,
    ConnectionSettings,
    LocalForward,
    load_config,
    merge_cli,
    parse_config,
)
from hybridrelay.bridge.specs import Protocol, parse_local_spec, parse_remote_spec
from hybridrelay.exceptions import ConfigurationError

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("bridge-*.yaml"))
KEY = "k" * 44
CS = f"Endpoint=sb://relay.example.com/;SharedAccessKeyName=send;SharedAccessKey={KEY}"


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(path: Path) -> None:
    config = load_config(path)
    assert config.local_forwards or config.remote_forwards
    assert "REPLACE-WITH" not in repr(config)


def test_full_document() -> None:
    config = parse_config(
        {
            "connection": {"connection_string": CS, "proxy": "http://u:secretpw@proxy:3128"},
            "bind_address": "127.0.0.2",
            "keep_alive_interval": 5,
            "connect_timeout": 7.5,
            "handshake_timeout": 3,
            "shutdown_grace_period": 0,
            "log_level": "DEBUG",
            "max_connections": 9,
            "udp_idle_timeout": 60,
            "max_udp_flows": 3,
            "local_forwards": [
                "8080:web",
                {
                    "hybrid_connection": "hosts",
                    "port": 2222,
                    "port_name": "ssh",
                    "allow": ["10.0.0.0/8", "::1/128"],
                    "max_connections": 2,
                },
                {"spec": "5353/dns/udp:hosts", "udp_idle_timeout": 1.5, "max_udp_flows": 4},
                {"protocol": "unix", "path": "/tmp/x.sock", "hybrid_connection": "u"},
            ],
            "remote_forwards": [
                "web:localhost:80",
                {"hybrid_connection": "hosts", "port_name": "ssh", "port": 22},
                {"spec": "hosts:dns/127.0.0.1:53/udp", "max_udp_flows": 1},
                {"hybrid_connection": "u", "protocol": "unix", "path": "/tmp/y.sock"},
            ],
        }
    )
    assert config.connection.key_name == "send"
    assert config.keep_alive_interval == 5.0
    assert config.shutdown_grace_period == 0.0
    assert config.log_level == "debug"
    first, second, third, fourth = config.local_forwards
    assert first.spec == parse_local_spec("8080:web")
    assert config.bind_host(first) == "127.0.0.2"
    assert second.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.max_connections_of(second) == 2
    assert config.max_connections_of(first) == 9
    assert third.spec.protocol is Protocol.UDP
    assert config.udp_idle_timeout_of(third) == 1.5
    assert config.max_udp_flows_of(third) == 4
    assert fourth.spec.path == "/tmp/x.sock"
    assert [r.spec for r in config.remote_forwards][:2] == [
        parse_remote_spec("web:localhost:80"),
        parse_remote_spec("hosts:ssh/localhost:22"),
    ]
    assert set(config.edge_routes()) == {"web", "hosts", "u"}
    text = repr(config)
    assert KEY not in text
    assert "secretpw" not in text
    assert "u:***@proxy:3128" in text


def test_allow_list() -> None:
    forward = LocalForward(parse_local_spec("1:x"), allow=(ipaddress.ip_network("10.0.0.0/8"),))
    assert forward.allows("10.1.2.3")
    assert forward.allows("::ffff:10.1.2.3")
    assert not forward.allows("11.0.0.1")
    assert not forward.allows("not-an-address")
    assert LocalForward(parse_local_spec("1:x")).allows("203.0.113.5")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"bogus": 1}, "unknown key\\(s\\): bogus"),
        ({"connection": {"endpoint": "sb://x", "colour": 1}}, "connection.colour"),
        ({"local_forwards": [{"spec": "1:x", "extra": True}]}, r"local_forwards\[0\].extra"),
        ({"remote_forwards": [{"spec": "x:1", "hots": "a"}]}, r"remote_forwards\[0\].hots"),
        ({"local_forwards": ["nonsense"]}, r"local_forwards\[0\]: -L 'nonsense'"),
        ({"local_forwards": [{"port": 1}]}, r"local_forwards\[0\].hybrid_connection: required"),
        ({"local_forwards": [{"hybrid_connection": "x"}]}, r"local_forwards\[0\].port: required"),
        (
            {"local_forwards": [{"spec": "1:x", "port": 2}]},
            r"local_forwards\[0\].port: not allowed together with 'spec'",
        ),
        (
            {"local_forwards": [{"spec": "1:x", "allow": ["10.0.0.300/8"]}]},
            "not a CIDR",
        ),
        (
            {"local_forwards": [{"spec": "unix:/a:x", "allow": ["10.0.0.0/8"]}]},
            "Unix socket forwards have no CIDRs",
        ),
        (
            {"local_forwards": [{"protocol": "sctp", "port": 1, "hybrid_connection": "x"}]},
            "'sctp' is not tcp, udp or unix",
        ),
        (
            {"remote_forwards": [{"hybrid_connection": "x", "protocol": "unix", "port": 1}]},
            r"remote_forwards\[0\].path: required",
        ),
        (
            {"remote_forwards": [{"hybrid_connection": "x", "port": 0}]},
            "integer from 1 to 65535",
        ),
        ({"keep_alive_interval": "fast"}, "keep_alive_interval: expected a number"),
        ({"keep_alive_interval": 0}, "keep_alive_interval: expected a number of at least"),
        ({"max_connections": True}, "max_connections: expected an integer"),
        ({"log_level": "chatty"}, "log_level: 'chatty' is not one of"),
        ({"local_forwards": {"a": 1}}, "local_forwards: expected a list"),
        ({"connection": "Endpoint=sb://x"}, "connection: expected a mapping"),
        (
            {"connection": {"connection_string": CS, "endpoint": "sb://y"}},
            "either connection_string or",
        ),
        ({"connection": {"connection_string": "Endpoint=ftp://x"}}, "connection_string"),
        ({"connection": {"key_name": "a"}}, "key_name and key go together"),
        ({"connection": {"key_name": "a", "key": "b", "token": "t"}}, "cannot be combined"),
        ({"connection": {"endpoint": "sb://x", "proxy": "socks5://p:1"}}, "connection.proxy"),
        ({"local_forwards": ["1:x", "127.0.0.1:1:x"]}, "bound twice"),
        ({"local_forwards": ["unix:/a:x", "unix:/a#n:y"]}, "bound twice"),
        (
            {"remote_forwards": ["x:localhost:1", "x:localhost:2"]},
            "several routes share it, so each needs a port name",
        ),
        ({"remote_forwards": ["x:a/localhost:1", "x:localhost:2"]}, "each needs a port name"),
        ({"remote_forwards": ["x:a/localhost:1", "x:a/localhost:2"]}, "port name used twice"),
        (
            {
                "connection": {"connection_string": CS + ";EntityPath=only"},
                "local_forwards": ["1:other"],
            },
            "EntityPath='only'",
        ),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_documents(document: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_config(document)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read bridge config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(ConfigurationError, match="invalid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"remote_forwards": [{"spec": "x:1", "nope": 1}]}))
    with pytest.raises(ConfigurationError, match=r"unknown.yaml: .*remote_forwards\[0\].nope"):
        load_config(unknown)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == BridgeConfig()


def test_cli_wins_and_forwards_add_up() -> None:
    file_config = parse_config(
        {
            "connection": {"connection_string": CS, "proxy": "http://proxy:1"},
            "keep_alive_interval": 10,
            "local_forwards": ["1:a"],
            "remote_forwards": ["b:localhost:2"],
        }
    )
    merged = merge_cli(
        file_config,
        ["-L", "3:c", "-R", "d:localhost:4", "-a", "2", "--log-level", "warning"]
        + ["-K", "other", "-k", "otherkey"],
    )
    assert [str(f.spec) for f in merged.local_forwards] == ["1:a", "3:c"]
    assert [str(f.spec) for f in merged.remote_forwards] == ["b:localhost:2", "d:localhost:4"]
    assert merged.keep_alive_interval == 2.0
    assert merged.log_level == "warning"
    assert merged.connection.key_name == "other"
    assert merged.connection.key == "otherkey"
    assert merged.connection.endpoint == "sb://relay.example.com/"
    assert merged.connection.proxy == "http://proxy:1"

    token = merge_cli(file_config, ["-s", "SharedAccessSignature sr=x&sig=y"])
    assert token.connection.token is not None
    assert token.connection.key is None and token.connection.key_name is None

    replaced = merge_cli(
        file_config, ["-x", "Endpoint=ws://127.0.0.1:9/", "-e", "ws://127.0.0.1:8/"]
    )
    assert replaced.connection == ConnectionSettings(
        endpoint="ws://127.0.0.1:8/", proxy="http://proxy:1"
    )


def test_cli_errors() -> None:
    with pytest.raises(ConfigurationError, match="-L 'x'"):
        merge_cli(BridgeConfig(), ["-L", "x"])
    with pytest.raises(
        ConfigurationError, match="--connect-timeout: expected a number of at least"
    ):
        merge_cli(BridgeConfig(), ["--connect-timeout", "0"])
    with pytest.raises(ConfigurationError, match="several routes"):
        merge_cli(parse_config({"remote_forwards": ["x:localhost:1"]}), ["-R", "x:localhost:2"])
    with pytest.raises(ConfigurationError, match="bind_address"):
        merge_cli(BridgeConfig(), ["--bind-address", "not valid!"])
