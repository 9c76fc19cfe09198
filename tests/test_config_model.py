"""The configuration models: checked on construction, one reader, one set of flags.

The relay's and the bridge's models are held to the same rules whether built in code, read
from YAML or given on the command line; the YAML reader and the command line must agree on
every field that has a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.bridge.config import (
    BridgeConfig,
    ConnectionSettings,
    HttpForward,
    LocalForward,
    RemoteForward,
    merge_cli,
    parse_config,
)
from hybridrelay.bridge.specs import parse_local_spec, parse_remote_spec
from hybridrelay.cli.main import build_parser
from hybridrelay.cli.serve_app import ServeAppConfig, add_serve_app_arguments
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server.config import (
    HybridConnectionConfig,
    IngressConfig,
    LimitsConfig,
    RelayConfig,
    ServerSettings,
    StoreSettings,
    TlsConfig,
)
from hybridrelay.settings import Setting, apply, given_arguments, walk

KEY = "k" * 44

# One valid instance's arguments for each model with required fields.
REQUIRED: dict[type[Any], dict[str, Any]] = {
    ServerSettings: {"plaintext": True},
    TlsConfig: {"cert": "c.pem", "key": "k.pem"},
    HybridConnectionConfig: {"name": "hc"},
    IngressConfig: {"host": "127.0.0.1", "port": 1, "hybrid_connection": "hc"},
    LocalForward: {"spec": parse_local_spec("1:hc")},
    RemoteForward: {"spec": parse_remote_spec("hc:localhost:1")},
    HttpForward: {"hybrid_connection": "hc", "target": "http://127.0.0.1:1"},
}
MODELS = [
    LimitsConfig,
    ServerSettings,
    TlsConfig,
    HybridConnectionConfig,
    IngressConfig,
    BridgeConfig,
    ConnectionSettings,
    LocalForward,
    RemoteForward,
    HttpForward,
]


def bounded_fields() -> list[tuple[type[Any], str, Any]]:
    """(model, field, a value just outside its bounds) for every bounded number."""
    cases = []
    for model in MODELS:
        for f in dataclasses.fields(model):
            meta = f.metadata.get("setting")
            if not isinstance(meta, Setting):
                continue
            integer = "int" in str(f.type)
            step = 1 if integer else 0.0005
            if meta.low is not None:
                cases.append((model, f.name, int(meta.low) - 1 if integer else meta.low - step))
            if meta.high is not None:
                cases.append((model, f.name, int(meta.high) + 1 if integer else meta.high * 2))
    return cases


@pytest.mark.parametrize(
    ("model", "name", "value"),
    bounded_fields(),
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_a_value_out_of_bounds_is_refused_on_construction(
    model: type[Any], name: str, value: Any
) -> None:
    arguments = REQUIRED.get(model, {})
    model(**arguments)  # valid as it is
    with pytest.raises(ConfigurationError, match=rf"^{name}: expected an? (integer|number)"):
        model(**{**arguments, name: value})


def test_there_are_bounded_fields_in_both_programs() -> None:
    models = {model for model, _, _ in bounded_fields()}
    assert {LimitsConfig, ServerSettings, BridgeConfig, LocalForward} <= models


def test_built_in_code_as_strictly_as_from_a_file() -> None:
    with pytest.raises(ConfigurationError, match="port"):
        RelayConfig(server=ServerSettings(port=70000, plaintext=True))
    with pytest.raises(ConfigurationError, match="no 'tls' section"):
        RelayConfig(server=ServerSettings())
    with pytest.raises(ConfigurationError, match="max_message_size"):
        LimitsConfig(max_message_size=10)
    with pytest.raises(ConfigurationError, match="expected a string"):
        ServerSettings(host=9400, plaintext=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="is not a configured hybrid connection"):
        RelayConfig(
            server=ServerSettings(plaintext=True),
            ingress=(IngressConfig(host="127.0.0.1", port=1, hybrid_connection="nowhere"),),
        )
    with pytest.raises(ConfigurationError, match="log_level: 'chatty' is not one of"):
        BridgeConfig(log_level="chatty")
    with pytest.raises(ConfigurationError, match="shutdown_grace_period"):
        BridgeConfig(shutdown_grace_period=-1)
    assert BridgeConfig(shutdown_grace_period=0).shutdown_grace_period == 0.0
    with pytest.raises(ConfigurationError, match="several routes"):
        BridgeConfig(
            remote_forwards=(
                RemoteForward(parse_remote_spec("x:localhost:1")),
                RemoteForward(parse_remote_spec("x:localhost:2")),
            )
        )
    # A replaced value is checked too: the management plane hands the relay new ones.
    config = RelayConfig(server=ServerSettings(plaintext=True))
    with pytest.raises(ConfigurationError, match="rendezvous_timeout"):
        dataclasses.replace(config, limits=dataclasses.replace(config.limits, rendezvous_timeout=0))
    # Numbers given as integers are floats in the model, as they are when read from YAML.
    assert isinstance(LimitsConfig(rendezvous_timeout=5).rendezvous_timeout, float)


# -- YAML and the command line agree -----------------------------------------------------------

#: A value other than the default for every field with a flag: (YAML value, command-line text).
SAMPLES: dict[str, tuple[Any, list[str]]] = {
    "server.host": ("127.0.0.2", ["127.0.0.2"]),
    "server.port": (9401, ["9401"]),
    "server.shutdown_grace_period": (2.5, ["2.5"]),
    "server.workers": (2, ["2"]),  # with store.cluster, sampled in the same run
    "server.worker_port": (9410, ["9410"]),
    "management.host": ("127.0.0.3", ["127.0.0.3"]),
    "management.port": (9411, ["9411"]),
    "metrics_port": (9464, ["9464"]),
    "metrics_host": ("127.0.0.4", ["127.0.0.4"]),
    "connection.endpoint": ("sb://relay.example.com/", ["sb://relay.example.com/"]),
    "connection.key_name": ("rule", ["rule"]),
    "connection.key": (KEY, [KEY]),
    "connection.token": ("SharedAccessSignature sr=a&sig=b", ["SharedAccessSignature sr=a&sig=b"]),
    "connection.proxy": ("http://proxy.example:3128", ["http://proxy.example:3128"]),
    "connection.ca_file": ("/etc/ca.pem", ["/etc/ca.pem"]),
    "connection.more_endpoints": (["sb://node2.example.com/"], ["sb://node2.example.com/"]),
    "store.cluster": ("redis://127.0.0.1:6379/0", ["redis://127.0.0.1:6379/0"]),
    "local_forwards": (
        ["8080:web", "unix:/tmp/a.sock#n:hc"],
        ["8080:web", "unix:/tmp/a.sock#n:hc"],
    ),
    "remote_forwards": (
        ["hc:localhost:22", "other:a/10.0.0.1:53/udp"],
        ["hc:localhost:22", "other:a/10.0.0.1:53/udp"],
    ),
    "http_forwards": (["api:http://127.0.0.1:8000/v1"], ["api:http://127.0.0.1:8000/v1"]),
    "bind_address": ("127.0.0.3", ["127.0.0.3"]),
    "keep_alive_interval": (7.5, ["7.5"]),
    "connect_timeout": (3, ["3"]),
    "shutdown_grace_period": (0, ["0"]),
    "log_level": ("debug", ["debug"]),
    # Booleans: the flag alone (argparse's BooleanOptionalAction).
    "access_log": (False, ["--no-access-log"]),
    "rewrite_cookie_path": (True, ["--rewrite-cookie-path"]),
}
#: Fields that cannot be given together (a key or a token): one run each.
EXCLUSIVE = [{"connection.token"}, {"connection.key_name", "connection.key"}]


def flagged(model: type[Any]) -> dict[str, tuple[str, ...]]:
    result = {}
    for name, f, _ in walk(model):
        meta = f.metadata["setting"]
        if meta.flags:
            result[name] = meta.flags
    return result


def yaml_path(model: type[Any], dotted: str) -> list[str]:
    """The YAML keys leading to a field (its section and key, or the field names)."""
    path: list[str] = []
    cls: Any = model
    for part in dotted.split("."):
        f = next(f for f in dataclasses.fields(cls) if f.name == part)
        meta = f.metadata["setting"]
        if meta.section:
            path.append(meta.section)
        path.append(meta.key or f.name)
        cls = typing.get_type_hints(cls)[part]
    return path


def runs(model: type[Any]) -> list[set[str]]:
    names = set(flagged(model))
    exclusive = [group & names for group in EXCLUSIVE if group & names]
    if not exclusive:
        return [names]
    rest = names - set().union(*exclusive)
    return [rest | group for group in exclusive]


@pytest.mark.parametrize("model", [RelayConfig, BridgeConfig], ids=lambda m: m.__name__)
def test_every_flag_has_a_sample(model: type[Any]) -> None:
    missing = set(flagged(model)) - set(SAMPLES)
    assert not missing, f"add a sample for {missing} to SAMPLES"


def _document(model: type[Any], names: set[str], base: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name in names:
        *parents, key = yaml_path(model, name)
        target = document
        for parent in parents:
            target = target.setdefault(parent, {})
        target[key] = SAMPLES[name][0]
    return document


def _argv(model: type[Any], names: set[str]) -> list[str]:
    flags = flagged(model)
    argv: list[str] = []
    for name in sorted(names):
        for text in SAMPLES[name][1]:
            argv += [text] if text.startswith("--") else [flags[name][-1], text]
    return argv


@pytest.mark.parametrize("names", runs(RelayConfig), ids=lambda n: ",".join(sorted(n)))
def test_relay_yaml_and_command_line_agree(names: set[str]) -> None:
    base = {"server": {"plaintext": True}}
    from_yaml = RelayConfig.from_dict(_document(RelayConfig, names, base))
    args: argparse.Namespace = build_parser().parse_args(["serve", *_argv(RelayConfig, names)])
    from_cli = apply(RelayConfig.from_dict(base), given_arguments(args, RelayConfig))
    assert from_yaml == from_cli
    assert from_yaml != RelayConfig.from_dict(base)


@pytest.mark.parametrize("names", runs(BridgeConfig), ids=lambda n: ",".join(sorted(n)))
def test_bridge_yaml_and_command_line_agree(names: set[str]) -> None:
    from_yaml = parse_config(_document(BridgeConfig, names, {}))
    from_cli = merge_cli(BridgeConfig(), _argv(BridgeConfig, names))
    assert from_yaml == from_cli
    for name in names:  # every sample is a change, so a flag that does nothing fails
        head, _, rest = name.partition(".")
        value = getattr(getattr(from_cli, head), rest) if rest else getattr(from_cli, head)
        default = BridgeConfig()
        expected = getattr(getattr(default, head), rest) if rest else getattr(default, head)
        assert value != expected, name


# -- secrets -----------------------------------------------------------------------------------


def test_secrets_stay_out_of_repr_and_errors() -> None:
    config = parse_config(
        {
            "connection": {
                "endpoint": "sb://relay.example.com/",
                "key_name": "rule",
                "key": KEY,
                "proxy": "http://user:proxysecret@proxy:1",
            },
            "local_forwards": ["1:hc"],
        }
    )
    assert KEY not in repr(config) and "proxysecret" not in repr(config)
    relay = RelayConfig.from_dict(
        {
            "server": {"plaintext": True},
            "namespace": {
                "authorization_rules": [{"name": "r", "primary_key": KEY, "rights": ["Send"]}]
            },
        }
    )
    assert KEY not in repr(relay)
    for document in (
        {"connection": {"connection_string": f"nonsense{KEY}"}},
        {"connection": {"connection_string": f"Endpoint=ftp://x;SharedAccessKey={KEY}"}},
        {"connection": {"endpoint": "sb://x", "key": KEY}},
        {"connection": {"key": 5}},
    ):
        with pytest.raises(ConfigurationError) as info:
            parse_config(document)
        assert KEY not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        RelayConfig.from_dict(
            {
                "server": {"plaintext": True},
                "namespace": {
                    "authorization_rules": [
                        {"name": "r", "primary_key": "short-secret", "rights": ["Send"]}
                    ]
                },
            }
        )
    assert "short-secret" not in str(info.value)


# -- the reader never fails with anything but a ConfigurationError -----------------------------

_scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
)
_keys = st.sampled_from(
    [
        "server",
        "namespace",
        "limits",
        "ingress",
        "host",
        "port",
        "tls",
        "plaintext",
        "name",
        "hybrid_connections",
        "authorization_rules",
        "rights",
        "listen",
        "hybrid_connection",
        "connection",
        "local_forwards",
        "remote_forwards",
        "http_forwards",
        "spec",
        "protocol",
        "path",
        "allow",
        "max_connections",
        "log_level",
        "endpoint",
        "key",
        "connection_string",
        "target",
        "cert",
        "primary_key",
        "x",
    ]
)
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_documents)
def test_any_document_is_a_config_or_a_configuration_error(document: Any) -> None:
    for read in (RelayConfig.from_dict, parse_config):
        try:
            read(document)
        except ConfigurationError:
            pass


def test_serve_app_options_are_a_checked_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDRELAY_CONNECTION_STRING", raising=False)
    with pytest.raises(ConfigurationError, match="a connection string is required"):
        ServeAppConfig(app="pkg:app")
    with pytest.raises(ConfigurationError, match="lifespan: 'sometimes' is not one of"):
        ServeAppConfig(app="pkg:app", connection_string="x", lifespan="sometimes")
    config = ServeAppConfig(
        app="pkg:app", connection_string=f"Endpoint=sb://h/;SharedAccessKey={KEY}"
    )
    assert KEY not in repr(config)
    parser = argparse.ArgumentParser()
    add_serve_app_arguments(parser)
    monkeypatch.setenv("HYBRIDRELAY_CONNECTION_STRING", "from-the-environment")
    parsed = ServeAppConfig.from_arguments(parser.parse_args(["pkg:app", "--factory", "-e", "api"]))
    assert parsed == ServeAppConfig(
        app="pkg:app", connection_string="from-the-environment", entity="api", factory=True
    )
    given = ServeAppConfig.from_arguments(parser.parse_args(["pkg:app", "-x", "cs"]))
    assert given.connection_string == "cs"


@pytest.mark.parametrize(
    ("spread", "workers", "local_first"),
    [
        ("auto", 1, False),
        ("auto", 2, True),
        ("weighted", 2, False),
        ("local-first", 1, True),
    ],
)
def test_store_spread_auto_is_local_first_for_workers(
    spread: str, workers: int, local_first: bool
) -> None:
    """``store.spread: auto`` (the default): the workers of one machine keep senders on their
    own listeners (DECISIONS D22); a node per machine draws over every node's."""
    from hybridrelay.server.app import _local_first

    config = RelayConfig(
        server=ServerSettings(plaintext=True, workers=workers),
        store=StoreSettings(cluster="redis://127.0.0.1:6379/0", spread=spread),
    )
    assert _local_first(config) is local_first
    assert StoreSettings().spread == "auto"
