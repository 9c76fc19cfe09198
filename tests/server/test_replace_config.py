"""RelayServer.replace_config: a new configuration applies to what comes next, on a running
relay; what needs a restart is refused, not silently ignored."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server.config import HybridConnectionConfig, IngressConfig
from tests.conftest import RelayFactory
from tests.server.test_relay_websocket import AUTH, handshake_status, open_listener, session

pytestmark = pytest.mark.both_loops

LISTEN = "?sb-hc-action=listen"


async def test_entities_and_limits_apply_to_the_next_request(make_relay: RelayFactory) -> None:
    async with make_relay() as relay, session() as s:
        server = relay.server
        config = server.config
        assert (await handshake_status(relay, f"/$hc/new{LISTEN}", {AUTH: relay.token("new")}))[
            0
        ] == 404
        control = await open_listener(s, relay, "hc")
        server.replace_config(
            replace(
                config,
                hybrid_connections=(
                    *(e for e in config.hybrid_connections if e.name != "anon"),
                    HybridConnectionConfig("new"),
                ),
                limits=replace(config.limits, max_listeners_per_connection=1),
            )
        )
        new = await open_listener(s, relay, "new")  # added: listeners and senders reach it
        assert server.broker.listener_count("new") == 1
        status, _ = await handshake_status(
            relay, "/$hc/anon?sb-hc-action=connect", {AUTH: relay.token("anon")}
        )
        assert status == 404  # removed: no sender reaches it
        status, reason = await handshake_status(
            relay, f"/$hc/hc{LISTEN}", {AUTH: relay.token("hc")}
        )
        assert status == 429 and "at most 1 listeners" in reason  # the new limit
        assert server.broker.listener_count("hc") == 1  # the listener already there stays
        await control.close()
        await new.close()


async def test_an_entity_created_on_first_listen_survives_a_replacement(
    make_relay: RelayFactory,
) -> None:
    async with make_relay() as relay, session() as s:
        server = relay.server
        server.replace_config(replace(server.config, auto_create_hybrid_connections=True))
        control = await open_listener(s, relay, "made/on/listen")
        server.replace_config(replace(server.config, auto_create_hybrid_connections=False))
        assert server.store.get("made/on/listen") is not None
        await control.close()


async def test_what_needs_a_restart_is_refused(make_relay: RelayFactory) -> None:
    async with make_relay() as relay:
        server = relay.server
        config = server.config
        with pytest.raises(ConfigurationError, match="server section"):
            server.replace_config(replace(config, server=replace(config.server, port=1)))
        with pytest.raises(ConfigurationError, match="ingress"):
            server.replace_config(replace(config, ingress=(IngressConfig("127.0.0.1", 0, "hc"),)))
        assert server.config is config
