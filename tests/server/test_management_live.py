"""A change made through the management API takes effect on the running relay at once
(issue 13, docs/MANAGEMENT.md "Live effects"): a created entity accepts listeners as soon as
the call returns; a deleted entity closes its listeners and pending senders and answers 404;
a regenerated key refuses new tokens (listen, connect, renewToken) while connections already
relayed stay until the operator closes them with the runtime API.

Every change goes through the management listener over HTTP, as an operator's would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from hybridrelay.auth.sas import create_token
from tests.conftest import (
    LISTEN_KEY,
    LISTEN_KEY_NAME,
    ROOT_KEY,
    ROOT_KEY_NAME,
    Relay,
    RelayFactory,
)

pytestmark = pytest.mark.timeout(60)

ARM = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Relay/namespaces/hybridrelay"
VERSION = "?api-version=2021-11-01"


class Management:
    """The relay's management API, signed with the file's root rule."""

    def __init__(self, relay: Relay, session: aiohttp.ClientSession) -> None:
        assert relay.server.management_url is not None
        self.url = relay.server.management_url
        self.session = session
        token = create_token(
            "http://127.0.0.1/", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
        )
        self.headers = {"Authorization": token}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method, self.url + path, json=body, headers=self.headers
        ) as response:
            text = await response.text()
            assert response.status < 300, f"{method} {path}: {response.status} {text}"
            return json.loads(text) if text else None

    async def create_hc(self, name: str) -> None:
        await self.call("PUT", f"{ARM}/hybridConnections/{quote(name, safe='')}{VERSION}", {})

    async def delete_hc(self, name: str) -> None:
        await self.call("DELETE", f"{ARM}/hybridConnections/{quote(name, safe='')}{VERSION}")

    async def create_rule(self, name: str, rights: list[str]) -> dict[str, str]:
        rule = f"{ARM}/authorizationRules/{name}"
        await self.call("PUT", rule + VERSION, {"properties": {"rights": rights}})
        keys: dict[str, str] = await self.call("POST", f"{rule}/listKeys{VERSION}")
        return keys

    async def regenerate(self, name: str, key_type: str) -> dict[str, str]:
        keys: dict[str, str] = await self.call(
            "POST",
            f"{ARM}/authorizationRules/{name}/regenerateKeys{VERSION}",
            {"keyType": key_type},
        )
        return keys


@asynccontextmanager
async def managed(make_relay: RelayFactory) -> AsyncIterator[tuple[Relay, Management]]:
    async with make_relay(management=True) as relay, aiohttp.ClientSession() as session:
        yield relay, Management(relay, session)


def token(relay: Relay, entity: str, key_name: str, key: str) -> str:
    return relay.token(entity, key_name=key_name, key=key)


async def listen(
    session: aiohttp.ClientSession, relay: Relay, entity: str, tok: str
) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(
        f"{relay.base_url}/$hc/{entity}?sb-hc-action=listen&sb-hc-token={quote(tok)}",
        timeout=aiohttp.ClientWSTimeout(ws_close=5),
    )


async def connect_status(relay: Relay, entity: str, tok: str) -> int:
    """The HTTP status a sender's connect gets (101 when a listener took it)."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                f"{relay.base_url}/$hc/{entity}?sb-hc-action=connect&sb-hc-token={quote(tok)}"
            )
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_a_created_entity_accepts_listeners_when_the_call_returns(
    make_relay: RelayFactory,
) -> None:
    async with managed(make_relay) as (relay, api), aiohttp.ClientSession() as session:
        tok = relay.token("plant/line-1")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await listen(session, relay, "plant/line-1", tok)
        assert refused.value.status == 404
        await api.create_hc("plant/line-1")
        control = await listen(session, relay, "plant/line-1", tok)
        listed = await api.call("GET", "/runtime/listeners?hybridConnection=plant/line-1")
        assert [entry["hybridConnection"] for entry in listed["value"]] == ["plant/line-1"]
        await control.close()


async def test_a_deleted_entity_closes_listeners_and_pending_senders(
    make_relay: RelayFactory,
) -> None:
    async with managed(make_relay) as (relay, api), aiohttp.ClientSession() as session:
        await api.create_hc("doomed")
        tok = relay.token("doomed")
        control = await listen(session, relay, "doomed", tok)
        # A sender waits for a listener that will never answer its accept.
        sender = asyncio.create_task(connect_status(relay, "doomed", tok))
        accept = await asyncio.wait_for(control.receive_json(), 10)
        assert "accept" in accept
        await api.delete_hc("doomed")
        assert await asyncio.wait_for(sender, 10) == 404
        closing = await asyncio.wait_for(control.receive(), 10)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        assert await connect_status(relay, "doomed", tok) == 404
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await listen(session, relay, "doomed", tok)
        assert refused.value.status == 404


async def test_a_regenerated_key_refuses_new_tokens_and_established_connections_stay(
    make_relay: RelayFactory,
) -> None:
    async with managed(make_relay) as (relay, api), aiohttp.ClientSession() as session:
        await api.create_hc("site")
        keys = await api.create_rule("edge", ["Listen", "Send"])
        old = keys["primaryKey"]
        old_token = token(relay, "site", "edge", old)
        control = await listen(session, relay, "site", old_token)
        # A connection relayed before the rotation.
        connecting = asyncio.create_task(
            session.ws_connect(
                f"{relay.base_url}/$hc/site?sb-hc-action=connect&sb-hc-token={quote(old_token)}"
            )
        )
        accept = await asyncio.wait_for(control.receive_json(), 10)
        listener_leg = await session.ws_connect(accept["accept"]["address"])
        sender = await asyncio.wait_for(connecting, 10)

        rotated = await api.regenerate("edge", "PrimaryKey")
        assert rotated["primaryKey"] != old
        assert rotated["secondaryKey"] == keys["secondaryKey"]
        # New tokens signed with the old key are refused: listen and connect...
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await listen(session, relay, "site", old_token)
        assert refused.value.status == 401
        assert await connect_status(relay, "site", old_token) == 401
        # ...while the other key and the new one work.
        fresh = await listen(
            session, relay, "site", token(relay, "site", "edge", rotated["primaryKey"])
        )
        await fresh.close()
        # The connection relayed before the rotation still carries data.
        await sender.send_bytes(b"before the rotation")
        message = await asyncio.wait_for(listener_leg.receive(), 10)
        assert message.data == b"before the rotation"
        # The operator's call closes it.
        listed = await api.call("GET", "/runtime/connections?hybridConnection=site")
        assert len(listed["value"]) == 1
        assert listed["value"][0]["bytesToListener"] >= len(b"before the rotation")
        closed = await api.call("DELETE", "/runtime/connections?hybridConnection=site")
        assert closed == {"closed": 1}
        ending = await asyncio.wait_for(sender.receive(), 10)
        assert ending.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        # A renewToken signed with the old key ends the control channel (1008).
        await control.send_str(json.dumps({"renewToken": {"token": old_token}}))
        closing = await asyncio.wait_for(control.receive(), 10)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1008
        await listener_leg.close()
        await sender.close()


async def test_the_operator_closes_a_listener_by_id(make_relay: RelayFactory) -> None:
    async with managed(make_relay) as (relay, api), aiohttp.ClientSession() as session:
        control = await listen(session, relay, "hc", relay.token("hc"))
        (entry,) = (await api.call("GET", "/runtime/listeners"))["value"]
        assert entry["remoteAddress"] == "127.0.0.1"
        assert await api.call("DELETE", f"/runtime/listeners/{quote(entry['id'])}") == {"closed": 1}
        closing = await asyncio.wait_for(control.receive(), 10)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1008
        assert (await api.call("GET", "/runtime/listeners"))["value"] == []


async def test_runtime_routes_refuse_what_they_should(make_relay: RelayFactory) -> None:
    async with managed(make_relay) as (relay, api):
        url = api.url
        session = api.session
        entity_token = relay.token("hc")  # scoped to one hybrid connection: not the namespace
        listen_only = create_token(
            "http://127.0.0.1/", LISTEN_KEY_NAME, LISTEN_KEY, expiry=int(time.time()) + 600
        )
        for headers, status in (
            ({}, 401),
            ({"Authorization": "SharedAccessSignature sr=x&sig=y&se=1&skn=z"}, 401),
            ({"Authorization": entity_token}, 403),
            ({"Authorization": listen_only}, 403),
        ):
            for path in ("/runtime/listeners", "/runtime/connections"):
                async with session.get(url + path, headers=headers) as response:
                    assert response.status == status, (path, headers)
                    body = await response.json()
                    assert set(body["error"]) == {"code", "message"}
        signed = api.headers
        async with session.put(url + "/runtime/listeners", headers=signed) as response:
            assert response.status == 405 and "GET" in response.headers["Allow"]
        async with session.delete(url + "/runtime/listeners", headers=signed) as response:
            assert response.status == 400  # neither an id nor ?hybridConnection=
        async with session.delete(url + "/runtime/connections/nope", headers=signed) as response:
            assert response.status == 404
        async with session.get(url + "/runtime/elsewhere", headers=signed) as response:
            assert response.status == 404
        # Health needs no token; a wrong method there is a 405, not the API's 404.
        async with session.get(url + "/healthz") as response:
            assert response.status == 200
        async with session.post(url + "/metrics") as response:
            assert response.status == 405
