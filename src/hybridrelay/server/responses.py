"""The relay's own HTTP answers: error responses and safe reason phrases.

Every refusal the relay writes (to a sender, a listener, a rendezvous) is an
:func:`error_response`, whose reason phrase carries a ``TrackingId`` as Azure's do (PROTOCOL.md
3.6); every reason phrase that comes from elsewhere (a listener's rejection or response) goes
through :func:`reason_phrase` before it reaches a status line. Every answer says
``Server: hybridrelay`` (:func:`name_the_server`), never the versions of Python and aiohttp.
"""

from __future__ import annotations

from aiohttp import web, web_response

from hybridrelay.transport.entropy import EntropyPool

__all__ = ["SERVER_HEADER", "error_response", "name_the_server", "reason_phrase", "tracking_id"]

#: The ``Server`` header of the relay's answers: the product without versions, which would
#: only tell a scanner which known flaws to try.
SERVER_HEADER = "hybridrelay"

#: Longest reason phrase the relay writes.
_REASON_LIMIT = 512


_TRACKING_BYTES = EntropyPool(16)


def tracking_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives, made from the hex of
    16 random bytes with the version and variant bits set: the relay makes one per relayed
    HTTP request, and the UUID object in between showed in its profile (the bytes: from a
    pool, not a system call each)."""
    digits = _TRACKING_BYTES.take().hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


def reason_phrase(text: str) -> str:
    """``text`` made safe for a status line: no CR/LF or other control characters (each becomes
    a space), ASCII only (clients disagree on obs-text: anything else becomes ``?``), trimmed and
    bounded. Empty if nothing is left."""
    if text.isascii() and text.isprintable():  # the common "OK": nothing to replace
        return text.strip()[:_REASON_LIMIT]
    cleaned = "".join(
        (ch if ord(ch) < 128 else "?") if ch.isprintable() else " " for ch in text
    ).strip()
    return cleaned[:_REASON_LIMIT]


def error_response(status: int, description: str, track: str | None = None) -> web.Response:
    """An error answer whose reason phrase carries a TrackingId, as Azure's do."""
    text = f"{description} TrackingId:{track or tracking_id()}"
    return web.Response(status=status, reason=reason_phrase(text), text=text + "\n")


def name_the_server() -> None:
    """Make :data:`SERVER_HEADER` aiohttp's default ``Server`` header, set on every response
    of this process that names none: the relay's, its management listener's, aiohttp's 400s."""
    # aiohttp reads the module's SERVER_SOFTWARE when it prepares each response's headers.
    setattr(web_response, "SERVER_SOFTWARE", SERVER_HEADER)  # noqa: B010 (a Final elsewhere)
