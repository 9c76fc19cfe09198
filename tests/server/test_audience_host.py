"""The token's audience host (issue 17 finding 7): by default it must be a host the relay is
reached by (the request's Host, or public_base_url's), so that a token made for another
namespace that happens to share a key is refused; namespace.host names the one host instead,
and namespace.check_audience_host: false turns the check off (a proxy that rewrites Host)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from hybridrelay.auth.sas import create_token
from hybridrelay.server import RelayServer
from hybridrelay.server.access import served_hosts
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, relay_config

AUTH = "ServiceBusAuthorization"


def token_for(host: str, entity: str = "hc") -> str:
    return create_token(
        f"http://{host}/{entity}", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
    )


async def listen_status(server: RelayServer, token: str, host: str | None = None) -> int:
    headers = {AUTH: token} | ({"Host": host} if host else {})
    async with aiohttp.ClientSession() as s:
        try:
            ws = await s.ws_connect(
                f"{server.base_url}/$hc/hc?sb-hc-action=listen", headers=headers
            )
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def http_status(server: RelayServer, token: str) -> int:
    url = server.base_url.replace("ws", "http", 1) + "/hc/x"
    async with aiohttp.ClientSession() as s, s.get(url, headers={AUTH: token}) as response:
        return response.status


def test_served_hosts() -> None:
    assert served_hosts("127.0.0.1:9400", None) == {"127.0.0.1"}
    assert served_hosts("[::1]:9400", None) == {"::1"}
    assert served_hosts("Relay.Example.COM", "https://edge.example.com:8443/") == {
        "relay.example.com",
        "edge.example.com",
    }


@pytest.mark.timeout(60)
async def test_a_token_for_another_host_is_refused_by_default() -> None:
    async with RelayServer(relay_config()) as server:
        assert await listen_status(server, token_for("127.0.0.1")) == 101
        assert await listen_status(server, token_for(f"127.0.0.1:{server.port}")) == 101
        assert await listen_status(server, token_for("contoso.servicebus.windows.net")) == 403
        # The Host the client used is what counts: a name the relay is reached by.
        assert await listen_status(server, token_for("relay.test"), host="relay.test") == 101
        # HTTP relaying checks it too (no listener: a token that passes gets 502/404, not 403).
        assert await http_status(server, token_for("contoso.servicebus.windows.net")) == 403
        assert await http_status(server, token_for("127.0.0.1")) != 403


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("settings", "host", "status"),
    [
        ({"server": {"public_base_url": "https://relay.example.com"}}, "relay.example.com", 101),
        ({"namespace": {"host": "ns.example.com"}}, "ns.example.com", 101),
        ({"namespace": {"host": "ns.example.com"}}, "127.0.0.1", 403),
        ({"namespace": {"check_audience_host": False}}, "contoso.example", 101),
    ],
)
async def test_the_hosts_a_token_may_name_are_configurable(
    settings: dict[str, Any], host: str, status: int
) -> None:
    base = relay_config()
    document: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "plaintext": True} | settings.get("server", {}),
        "namespace": {
            "authorization_rules": [
                {"name": ROOT_KEY_NAME, "primary_key": ROOT_KEY, "rights": ["Listen", "Send"]}
            ],
            "hybrid_connections": [{"name": "hc"}],
        }
        | settings.get("namespace", {}),
    }
    assert base is not None
    async with RelayServer(type(base).from_dict(document)) as server:
        assert await listen_status(server, token_for(host)) == status
