"""The ``-H`` forward's own HTTP/1.1 client (``bridge/upstream_http.py``) against scripted
upstreams: raw asyncio servers on 127.0.0.1, port 0, that answer with the bytes a test gives
and record what reached them."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from hybridrelay.bridge import upstream_http
from hybridrelay.bridge.upstream_http import (
    READ_HIGH_WATER,
    UpstreamError,
    UpstreamPool,
    UpstreamUnreachable,
    request_target,
)
from tests.conftest import TlsFiles, eventually


@dataclass
class Scripted:
    url: str
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0


def _ok(body: bytes = b"hello", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@asynccontextmanager
async def scripted(
    answers: list[bytes], *, close_after: bool = False, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Scripted]:
    """An upstream that answers the n-th request (over all connections) with ``answers[n]``
    (the last one repeats); ``close_after``: it closes each connection after one answer;
    ``tls``: over TLS with this server context."""
    state = Scripted(url="")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        body = await reader.readexactly(int(line.split(b":")[1]))
                    if line.lower() == b"transfer-encoding: chunked":
                        body = await reader.readuntil(b"0\r\n\r\n")
                state.requests.append(head + body)
                index = min(len(state.requests), len(answers)) - 1
                writer.write(answers[index])
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def pool(url: str, read_timeout: float = 5.0) -> UpstreamPool:
    return UpstreamPool(url, connect_timeout=5.0, read_timeout=read_timeout)


async def fetch(
    client: UpstreamPool,
    url: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterator[bytes] | None = None,
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    response = await client.request(method, url, headers or [("Host", "h")], body)
    try:
        data = b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.release()
    return response.status, response.reason, response.headers, data


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_keep_alive_reuses_one_connection() -> None:
    async with scripted([_ok(b"one"), _ok(b"two")]) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/a"))[3] == b"one"
            status, reason, headers, body = await fetch(client, up.url + "/b?q=%2F")
        finally:
            await client.aclose()
    assert (status, reason, body) == (200, "OK", b"two")
    assert ("Content-Length", "3") in headers
    assert up.connections == 1
    assert up.requests[1].startswith(b"GET /b?q=%2F HTTP/1.1\r\nHost: h\r\n")


async def test_chunked_and_until_close_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with scripted([chunked]) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/"))[3] == b"abcde"
        finally:
            await client.aclose()
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end"
    async with scripted([until_close], close_after=True) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/"))[3] == b"to the end"
            assert (await fetch(client, up.url + "/"))[3] == b"to the end"
        finally:
            await client.aclose()
        assert up.connections == 2  # not kept: the body ended with the connection


async def test_head_keeps_content_length_and_the_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    async with scripted([head, _ok(b"after")]) as up:
        client = pool(up.url)
        try:
            status, _, headers, body = await fetch(client, up.url + "/", "HEAD")
            assert (status, body) == (200, b"")
            assert ("Content-Length", "1234") in headers
            assert (await fetch(client, up.url + "/"))[3] == b"after"
        finally:
            await client.aclose()
    assert up.connections == 1


async def test_interim_responses_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with scripted([answer + _ok(b"final", "X-Final: 1\r\n")]) as up:
        client = pool(up.url)
        try:
            status, _, headers, body = await fetch(client, up.url + "/")
        finally:
            await client.aclose()
    assert (status, body) == (200, b"final")
    assert ("X-Final", "1") in headers and all(name != "Link" for name, _ in headers)


async def test_bodies_go_chunked_or_as_they_are_with_a_length() -> None:
    async with scripted([_ok()]) as up:
        client = pool(up.url)
        try:
            await fetch(client, up.url + "/", "POST", body=parts(b"ab", b"", b"cde"))
            headers = [("Host", "h"), ("Content-Length", "4")]
            await fetch(client, up.url + "/", "PUT", headers, body=parts(b"wx", b"yz"))
            await fetch(client, up.url + "/", "DELETE")
        finally:
            await client.aclose()
    first, second, third = up.requests
    assert b"Transfer-Encoding: chunked\r\n" in first
    assert first.endswith(b"\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    assert b"chunked" not in second and second.endswith(b"\r\n\r\nwxyz")
    assert b"Content-Length: 0\r\n" in third  # a body-less DELETE says so, as aiohttp does


async def test_an_answer_before_the_whole_body_is_relayed() -> None:
    """An upstream that refuses an upload with 413 and closes without reading it."""
    refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"

    async def answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(refusal)
        await writer.drain()
        writer.close()

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(10_000):
            yield bytes(64 * 1024)
            await asyncio.sleep(0)

    server = await asyncio.start_server(answer_at_once, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = pool(url)
    try:
        status, _, _, body = await fetch(client, url + "/", "POST", body=endless())
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert (status, body) == (413, b"big")


async def test_a_stale_idle_connection_is_retried_once_for_a_request_without_a_body() -> None:
    async with scripted([_ok(b"fresh")], close_after=True) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/"))[3] == b"fresh"
            # The server closed the kept connection; the pool may not have seen it yet.
            assert (await fetch(client, up.url + "/"))[3] == b"fresh"
        finally:
            await client.aclose()
    assert up.connections == 2


async def test_header_line_breaks_are_refused() -> None:
    async with scripted([_ok()]) as up:
        client = pool(up.url)
        try:
            for bad in ("a\r\nX-Injected: 1", "a\nb", "a\x00b"):
                with pytest.raises(UpstreamError):
                    await fetch(client, up.url + "/", headers=[("Host", "h"), ("X-A", bad)])
        finally:
            await client.aclose()
    assert up.requests == []


async def test_failures_are_typed() -> None:
    async with scripted([b"NOT HTTP AT ALL\r\n\r\n"]) as up:
        client = pool(up.url)
        try:
            with pytest.raises(UpstreamError, match="malformed"):
                await fetch(client, up.url + "/")
        finally:
            await client.aclose()
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"
    async with scripted([cut], close_after=True) as up:
        client = pool(up.url)
        try:
            with pytest.raises(UpstreamError, match="mid-response"):
                await fetch(client, up.url + "/")
        finally:
            await client.aclose()
    with socket_closed_port() as port:
        client = pool(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamUnreachable):
            await fetch(client, f"http://127.0.0.1:{port}/")


async def test_a_silent_upstream_times_out() -> None:
    async with scripted([b""]) as up:  # reads the request, never answers
        client = pool(up.url, read_timeout=0.2)
        try:
            with pytest.raises(TimeoutError):
                await fetch(client, up.url + "/")
        finally:
            await client.aclose()


async def test_a_silent_upstream_times_out_on_a_reused_connection() -> None:
    """The read deadline is moved, not re-armed, per request: after answered waits on the
    same connection, a silent answer still times out."""
    async with scripted([_ok(), _ok(), b""]) as up:
        client = pool(up.url, read_timeout=0.3)
        try:
            for _ in range(2):
                assert (await fetch(client, up.url + "/"))[0] == 200
                await asyncio.sleep(0.2)  # the first wait's timer fires in between
            with pytest.raises(TimeoutError):
                await fetch(client, up.url + "/")
            assert up.connections == 1
        finally:
            await client.aclose()


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_http, "IDLE_TIMEOUT", 0.2)
    async with scripted([_ok()]) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/"))[0] == 200
            idle = client._idle[-1]
            await eventually(lambda: idle.closed)
            assert (await fetch(client, up.url + "/"))[0] == 200  # on a new connection
            assert up.connections == 2
        finally:
            await client.aclose()


async def test_a_connection_taken_again_is_not_closed_by_its_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_http, "IDLE_TIMEOUT", 0.1)
    async with scripted([_ok()]) as up:
        client = pool(up.url)
        try:
            assert (await fetch(client, up.url + "/"))[0] == 200
            conn = client._take_idle()  # in use again, as a request takes it
            assert conn is not None
            await asyncio.sleep(0.3)  # past the idle deadline it had in the pool
            assert not conn.closed
            client._idle.append(conn)  # idle again, without a deadline: reused as it is
            assert (await fetch(client, up.url + "/"))[0] == 200
            assert up.connections == 1
        finally:
            await client.aclose()


async def test_an_unread_body_is_bounded_by_pausing_the_upstream() -> None:
    size = 8 * 1024 * 1024
    big = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + bytes(size)
    async with scripted([big]) as up:
        client = pool(up.url)
        try:
            response = await client.request("GET", up.url + "/", [("Host", "h")], None)
            try:
                for _ in range(50):  # let the upstream write as much as it can
                    await asyncio.sleep(0.01)
                conn = response._conn
                assert conn._buffered <= READ_HIGH_WATER + 256 * 1024
                total = sum([len(chunk) async for chunk in response.chunks()])
            finally:
                response.release()
        finally:
            await client.aclose()
    assert total == size


async def test_https_upstreams_are_verified(tls_files: TlsFiles) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    async with scripted([_ok(b"secret")], tls=server) as up:
        trusting = ssl.create_default_context(cafile=tls_files.ca_file)
        client = UpstreamPool(up.url, ssl=trusting, connect_timeout=5.0, read_timeout=5.0)
        try:
            assert (await fetch(client, up.url + "/"))[3] == b"secret"
            assert (await fetch(client, up.url + "/"))[3] == b"secret"
        finally:
            await client.aclose()
        assert up.connections == 1
        default = pool(up.url)  # the system's trust store: this CA is not in it
        with pytest.raises(UpstreamUnreachable, match="certificate"):
            await fetch(default, up.url + "/")


def test_request_target_keeps_the_senders_encoding() -> None:
    assert request_target("http://u:1/a%2Fb?x=%20") == "/a%2Fb?x=%20"
    assert request_target("http://u:1") == "/"
    assert request_target("http://u:1/a b") == "/a%20b"


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        sock.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass
