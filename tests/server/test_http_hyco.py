"""HTTP relaying to Microsoft's hyco-https listener (tests/node/https-listener.js) behind our
relay: the size boundaries of the inline/rendezvous switch in both directions, a chunked upload
streamed as one fragmented message to ``ws@6``, keep-alive across rendezvous-sized responses,
and hyco-https' ``res.end(<empty Buffer>)`` bug (PROTOCOL.md 6.6) ending in the relay's 504.

The route-by-route checks live in tests/e2e/test_node_interop.py; this module reuses its
helpers. Skipped when node or tests/node/node_modules is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.e2e.test_node_interop import (
    _MISSING,
    KEY,
    binary,
    http_url,
    listen_url,
    node_script,
    python_token,
    running_relay,
)

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

KIB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("client_addr")[1])


async def test_hyco_https_body_boundaries_chunked_and_keep_alive() -> None:
    async with running_relay(limits={"http_response_timeout": 3}) as server:
        async with node_script(
            "https-listener.js", "--url", listen_url(server), env={"HYCO_KEY": KEY}
        ) as listener:
            await listener.expect("ready")
            headers = {"ServiceBusAuthorization": python_token(server)}
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as http:
                ports = set()
                for size in (64 * KIB, 64 * KIB + 1, 10 * 1024 * KIB):
                    body = binary(size, size % 251)
                    echo = await http.post(f"{http_url(server)}/echo", content=body)
                    assert echo.status_code == 200, size
                    assert echo.headers["x-hyco-kit-sha256"] == sha(body)
                    assert sha(echo.content) == sha(body), size
                    ports.add(local_port(echo))

                    large = await http.get(f"{http_url(server)}/large?size={size}")
                    assert large.status_code == 200
                    assert len(large.content) == size
                    assert sha(large.content) == large.headers["x-hyco-kit-sha256"]
                    ports.add(local_port(large))

                parts = [binary(n, n % 7) for n in (1, 70 * KIB, 5, 300 * KIB)]

                async def chunks() -> AsyncIterator[bytes]:
                    for part in parts:
                        yield part

                chunked = await http.post(f"{http_url(server)}/echo", content=chunks())
                assert chunked.status_code == 200
                assert chunked.content == b"".join(parts)
                ports.add(local_port(chunked))
                # Every response, inline or over a rendezvous, kept the connection open.
                assert len(ports) == 1, ports

                # hyco-https answers an empty body with res.end(<empty Buffer>), which sends
                # nothing at all (PROTOCOL.md 6.6): the relay's deadline turns it into a 504.
                empty = await http.post(f"{http_url(server)}/echo", content=b"")
                assert empty.status_code == 504
                assert "via" not in empty.headers

                # The listener is still fine afterwards.
                small = await http.get(f"{http_url(server)}/small")
                assert small.text == "hello from hyco-https\n"
