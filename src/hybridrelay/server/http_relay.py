"""HTTP request relaying (PROTOCOL.md section 6): the relay side.

Senders' plain HTTP requests (E6) become ``request`` messages for a listener; the listener's
``response`` (+ body) becomes the HTTP response. This module owns everything HTTP-specific so
that ``app.py`` only routes to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from hybridrelay.protocol.messages import ControlMessage
from hybridrelay.server.registry import ControlChannel

if TYPE_CHECKING:
    from hybridrelay.server.app import RelayServer

__all__ = ["HttpRelay"]


class HttpRelay:
    def __init__(self, server: RelayServer) -> None:
        self._server = server

    async def handle_sender_request(
        self, request: web.Request, raw_path: str, raw_query: str
    ) -> web.StreamResponse:
        from hybridrelay.server.app import error_response

        return error_response(404, "No such endpoint (HTTP relaying is not available yet).")

    async def handle_request_rendezvous(
        self, request: web.Request, params: dict[str, str]
    ) -> web.StreamResponse:
        from hybridrelay.server.app import error_response

        return error_response(403, "The rendezvous address is not valid or has expired.")

    async def on_control_message(self, channel: ControlChannel, message: ControlMessage) -> bool:
        """A listener's message other than renewToken; False closes the channel (1002)."""
        return False

    async def on_control_binary(self, channel: ControlChannel, data: bytes | str) -> None:
        """A binary message on a control channel (response bodies); stray empty ones ignored."""

    def forget_channel(self, channel: ControlChannel) -> None:
        """The channel is gone: fail the requests still waiting on it."""
