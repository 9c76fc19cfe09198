"""Helpers shared by the SDK's end-to-end tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    SharedAccessKeyTokenProvider,
)
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay


def root_provider() -> SharedAccessKeyTokenProvider:
    return SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY)


def endpoint_of(relay: Relay) -> str:
    return relay.base_url


def make_client(relay: Relay, entity: str = "hc", **kwargs: Any) -> HybridConnectionClient:
    return HybridConnectionClient(
        relay.base_url,
        entity,
        root_provider(),
        ca_file=relay.ca_file,
        **kwargs,
    )


@asynccontextmanager
async def open_listener(
    relay: Relay, entity: str = "hc", **kwargs: Any
) -> AsyncIterator[HybridConnectionListener]:
    listener = HybridConnectionListener(
        relay.base_url,
        entity,
        root_provider(),
        ca_file=relay.ca_file,
        **kwargs,
    )
    async with listener:
        yield listener


async def read_all(stream: HybridConnectionStream, chunk: int = 65536) -> bytes:
    parts = []
    while data := await stream.read(chunk):
        parts.append(data)
    return b"".join(parts)


async def write_random(stream: HybridConnectionStream, size: int) -> str:
    """Write ``size`` random bytes in uneven pieces; return their SHA-256."""
    digest = hashlib.sha256()
    sent = 0
    piece = 1
    while sent < size:
        data = os.urandom(min(piece, size - sent))
        digest.update(data)
        await stream.write(data)
        sent += len(data)
        piece = piece * 3 + 1 if piece < 200_000 else 1
    return digest.hexdigest()


async def read_digest(stream: HybridConnectionStream) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while data := await stream.read(50_000):
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


async def accept_one(listener: HybridConnectionListener) -> HybridConnectionStream:
    stream = await listener.accept_connection()
    assert stream is not None
    return stream
