"""What the relay logs of a request it cannot parse: one short line, never the request itself.

aiohttp logs a malformed request at ERROR with a traceback whose exception quotes the raw
line it choked on, which can be a ``ServiceBusAuthorization`` header with its signature; a
client sending garbage wrote about 11 lines per request. The relay's HTTP server logs to
:data:`HTTP_LOGGER` instead, whose filter turns each parse error into one refusal line
(``kind=malformed``, status 400, the parser's complaint without the bytes it quotes),
rate-limited like every refusal (:class:`~hybridrelay.observability.access_log.RefusalLog`).
Other records (a handler's unexpected exception) pass unchanged.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from hybridrelay.observability.access_log import RefusalLog

__all__ = ["HTTP_LOGGER", "short_reason"]

#: The logger given to the relay's aiohttp server (``web.Server(logger=...)``).
HTTP_LOGGER = logging.getLogger("hybridrelay.server.http")

_MAX_REASON = 80


def short_reason(exc: HttpProcessingError) -> str:
    """The parser's complaint without what it quotes: the first line of its message, which
    names the rule ("Invalid header token"), never the request's bytes (quoted on later lines)."""
    first = (exc.message or "").strip().splitlines()
    text = first[0].rstrip(": ") if first else ""
    # A message that quotes bytes on its first line is cut before them.
    text = text.split("b'", 1)[0].split('b"', 1)[0].rstrip(": ")
    return (text or type(exc).__name__)[:_MAX_REASON]


class _MalformedRequests(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.refusals = RefusalLog()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        self.refusals.refused("malformed", "", 400, short_reason(exc), str(remote or "") or None)
        return False


# Once per process: the logger is shared by every relay in it, and so is its rate limit.
HTTP_LOGGER.addFilter(_MalformedRequests())
