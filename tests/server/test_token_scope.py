"""Token scope end to end (issue 11, PROTOCOL.md 3.5): with nested hybrid connections
``plant``, ``plant/line-1`` and ``plant/line-1/plc``, a token for a child is refused on every
ancestor (403) and a token for an ancestor works on every child, for listen, connect, HTTP,
renewToken and the runtime-information GET, with namespace rules and entity rules alike.

The peers are raw aiohttp WebSockets and httpx, independent of our SDK.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import httpx
import pytest

from hybridrelay.auth.sas import create_token
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, RelayFactory
from tests.server.http_peer import peer_listener

pytestmark = pytest.mark.timeout(60)

AUTH = "ServiceBusAuthorization"
TREE = ("plant", "plant/line-1", "plant/line-1/plc")
#: Every entity has its own rule called "edge", each with its own key.
EDGE = "edge"
KEYS = {name: f"edge-key-of-{name.replace('/', '-')}-0123456789abcdefghij" for name in TREE}
ENTITIES = [
    {
        "name": name,
        "authorization_rules": [
            {"name": EDGE, "primary_key": KEYS[name], "rights": ["Listen", "Send"]}
        ],
    }
    for name in TREE
]
#: Token paths: the namespace, then each entity of the tree.
SCOPES = ("", *TREE)
SIGNERS = ("namespace", "entity")


def covers(scope: str, target: str) -> bool:
    return scope == "" or target == scope or target.startswith(scope + "/")


def token(relay: Relay, scope: str, signer: str, target: str) -> str:
    """A token for ``scope``: signed by the namespace rule, or by ``target``'s own entity rule
    (the only entity rule the relay would try for a request on ``target``)."""
    audience = f"http://127.0.0.1:{relay.server.port}/{scope}"
    expiry = int(time.time()) + 600
    if signer == "namespace":
        return create_token(audience, ROOT_KEY_NAME, ROOT_KEY, expiry=expiry)
    return create_token(audience, EDGE, KEYS[target], expiry=expiry)


def cases() -> list[tuple[str, str, str]]:
    return list(itertools.product(TREE, SCOPES, SIGNERS))


@asynccontextmanager
async def nested_relay(make_relay: RelayFactory) -> AsyncIterator[Relay]:
    async with make_relay(entities=ENTITIES) as relay:
        yield relay


async def upgrade_status(session: aiohttp.ClientSession, url: str, auth: str) -> int:
    try:
        ws = await session.ws_connect(url, headers={AUTH: auth})
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


async def test_listen(make_relay: RelayFactory) -> None:
    async with nested_relay(make_relay) as relay, aiohttp.ClientSession() as session:
        for target, scope, signer in cases():
            url = f"{relay.base_url}/$hc/{target}?sb-hc-action=listen"
            status = await upgrade_status(session, url, token(relay, scope, signer, target))
            expected = 101 if covers(scope, target) else 403
            assert status == expected, (target, scope, signer)


async def test_connect(make_relay: RelayFactory) -> None:
    async with nested_relay(make_relay) as relay, aiohttp.ClientSession() as session:
        async with AsyncExitStack() as stack:
            controls = {}
            for target in TREE:
                controls[target] = await session.ws_connect(
                    f"{relay.base_url}/$hc/{target}?sb-hc-action=listen",
                    headers={AUTH: token(relay, target, "namespace", target)},
                    autoclose=False,
                )
                stack.push_async_callback(controls[target].close)
            for target, scope, signer in cases():
                url = f"{relay.base_url}/$hc/{target}?sb-hc-action=connect"
                auth = token(relay, scope, signer, target)
                if not covers(scope, target):
                    assert await upgrade_status(session, url, auth) == 403, (target, scope, signer)
                    continue
                sender = asyncio.create_task(session.ws_connect(url, headers={AUTH: auth}))
                async with asyncio.timeout(10):
                    message = await controls[target].receive()
                address = json.loads(message.data)["accept"]["address"]
                rendezvous = await session.ws_connect(address)
                ws = await asyncio.wait_for(sender, 10)
                await ws.send_bytes(b"ping")
                received = await asyncio.wait_for(rendezvous.receive(), 10)
                assert received.data == b"ping", (target, scope, signer)
                await asyncio.wait_for(asyncio.gather(ws.close(), rendezvous.close()), 10)


async def test_connect_with_a_suffix(make_relay: RelayFactory) -> None:
    """A sender's suffix is part of the request's path: a token signed for
    ``plant/line-1/plc`` opens ``/$hc/plant/line-1/plc/x`` but not ``/$hc/plant/other``."""
    async with nested_relay(make_relay) as relay, aiohttp.ClientSession() as session:
        plc = token(relay, "plant/line-1/plc", "namespace", "plant")
        control = await session.ws_connect(
            f"{relay.base_url}/$hc/plant?sb-hc-action=listen",
            headers={AUTH: token(relay, "plant", "namespace", "plant")},
            autoclose=False,
        )
        try:
            sibling = f"{relay.base_url}/$hc/plant/other?sb-hc-action=connect"
            assert await upgrade_status(session, sibling, plc) == 403
            dots = f"{relay.base_url}/$hc/plant/line-1/plc/%2E%2E/%2E%2E/x?sb-hc-action=connect"
            assert await upgrade_status(session, dots, plc) == 403
        finally:
            await control.close()


async def test_http(make_relay: RelayFactory) -> None:
    async with nested_relay(make_relay) as relay, AsyncExitStack() as stack:
        peers = {
            target: await stack.enter_async_context(
                peer_listener(relay.base_url, target, token(relay, target, "namespace", target))
            )
            for target in TREE
        }
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=10) as http:
            for target, scope, signer in cases():
                response = await http.get(
                    f"/{target}", headers={AUTH: token(relay, scope, signer, target)}
                )
                expected = 200 if covers(scope, target) else 403
                assert response.status_code == expected, (target, scope, signer)
            # The request's suffix counts: a token for a path below the entity opens that path.
            plc = token(relay, "plant/line-1/plc", "namespace", "plant")
            assert (await http.get("/plant/line-1/plc/x", headers={AUTH: plc})).status_code == 200
            # Dot segments in a suffix stay below the entity the request was routed to: this
            # reaches plc's listener, never plant's.
            before = {target: len(peer.received) for target, peer in peers.items()}
            dots = "/plant/line-1/plc/%2E%2E/%2E%2E/x"
            assert (await http.get(dots, headers={AUTH: plc})).status_code == 200
            after = {target: len(peer.received) for target, peer in peers.items()}
            assert after["plant/line-1/plc"] == before["plant/line-1/plc"] + 1
            assert after["plant"] == before["plant"]
            assert peers["plant/line-1/plc"].received[-1].target == dots


async def test_renew_token(make_relay: RelayFactory) -> None:
    async with nested_relay(make_relay) as relay, aiohttp.ClientSession() as session:
        for target, scope, signer in cases():
            control = await session.ws_connect(
                f"{relay.base_url}/$hc/{target}?sb-hc-action=listen",
                headers={AUTH: token(relay, target, signer, target)},
                autoclose=False,
            )
            renewal = {"renewToken": {"token": token(relay, scope, signer, target)}}
            await control.send_str(json.dumps(renewal))
            # The relay reads a control channel in order: a refused renewal closes it with
            # 1008; an accepted one lets the next message, which is not JSON, close it with
            # 1002. The close code says which message the relay stopped at.
            await control.send_str("this is not JSON")
            async with asyncio.timeout(10):
                message = await control.receive()
            assert message.type is aiohttp.WSMsgType.CLOSE, (target, scope, signer)
            expected = 1002 if covers(scope, target) else 1008
            assert control.close_code == expected, (target, scope, signer)
            await control.close()


async def test_runtime_information(make_relay: RelayFactory) -> None:
    markers = {"X-PROCESS-AT": "ServiceBus"}
    async with nested_relay(make_relay) as relay:
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=10) as http:
            for target, scope, signer in cases():
                response = await http.get(
                    f"/{target}?api-version=2016-07",
                    headers={"Authorization": token(relay, scope, signer, target), **markers},
                )
                expected = 200 if covers(scope, target) else 403
                assert response.status_code == expected, (target, scope, signer)
