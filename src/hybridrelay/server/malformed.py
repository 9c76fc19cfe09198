"""What the relay logs of a request it cannot parse: one short line, never the request itself.

aiohttp logs a malformed request at ERROR with a traceback whose exception quotes the raw
line it choked on, which can be a ``ServiceBusAuthorization`` header with its signature; a
client sending garbage wrote about 11 lines per request. Each relay gives its HTTP server its
own logger (:func:`http_server_logger`), which turns each parse error into one refusal
line of that relay (``kind=malformed``, status 400, the parser's complaint without the bytes it
quotes), rate-limited like its other refusals
(:class:`~hybridrelay.observability.access_log.RefusalLog`). The rate limit belongs to the
relay, not the process: two relays in one process (tests, an embedding application) do not
spend each other's burst. Other records (a handler's unexpected exception) pass unchanged,
under the name ``hybridrelay.server.http``.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from hybridrelay.observability.access_log import RefusalLog

__all__ = ["HTTP_LOGGER_NAME", "http_server_logger", "short_reason"]

HTTP_LOGGER_NAME = "hybridrelay.server.http"

_MAX_REASON = 80


def short_reason(exc: HttpProcessingError) -> str:
    """The parser's complaint without what it quotes: the first line of its message, which
    names the rule ("Invalid header token"), never the request's bytes (quoted on later lines)."""
    first = (exc.message or "").strip().splitlines()
    text = first[0].rstrip(": ") if first else ""
    # A message that quotes bytes on its first line is cut before them.
    text = text.split("b'", 1)[0].split('b"', 1)[0].rstrip(": ")
    return (text or type(exc).__name__)[:_MAX_REASON]


class _HttpServerLogger(logging.Logger):
    """aiohttp's server logs a parse error through ``exception()``, or through ``debug()`` when
    it is the connection's first request and its method is not one (often TLS or other
    non-HTTP bytes sent to a plain port). Both become one refusal line whatever this logger's
    level: which line a malformed request gets must not depend on whether debugging is on."""

    def __init__(self, refusals: RefusalLog) -> None:
        super().__init__(HTTP_LOGGER_NAME)
        self._refusals = refusals

    def _refused(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        exc = kwargs.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            return False
        remote = args[0] if args else None
        self._refusals.refused("malformed", "", 400, short_reason(exc), str(remote or "") or None)
        return True

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._refused(args, kwargs):
            super().debug(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if not self._refused(args, kwargs):
            super().exception(msg, *args, **kwargs)


def http_server_logger(refusals: RefusalLog) -> logging.Logger:
    """The logger for one relay's aiohttp server (``web.Server(logger=...)``): parse errors
    become refusal lines in ``refusals``; the rest propagates like a record of
    ``hybridrelay.server.http``.

    The logger is not registered with :mod:`logging` (a registered one would live as long as
    the process, one per relay ever started); it hangs below ``hybridrelay.server``, so the
    levels and handlers configured there apply to it."""
    logger = _HttpServerLogger(refusals)
    logger.parent = logging.getLogger("hybridrelay.server")
    return logger
