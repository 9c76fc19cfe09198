"""The WebSocket close handshake (RFC 6455 7.1, 5.5.1) as every socket of ours runs it, sans I/O.

A connection carries two close frames, one each way, and may be dropped once both went by, or
when the peer does not answer ours in time. Our sockets half-close (D2): the peer's close frame
is *reported*, not answered at once, and data keeps flowing our way until we send our own.
:class:`CloseHandshake` keeps that state and says, for each event, what the socket has to do:

* :meth:`~CloseHandshake.send`: our close frame's payload to write (once), and whether the
  connection may now be dropped or the peer owes us an answer (arm the close timer);
* :meth:`~CloseHandshake.receive`: whether the peer's close frame is news, and whether the
  connection may now be dropped;
* :meth:`~CloseHandshake.give_up`: the peer did not answer in time, or we close now: drop;
* :meth:`~CloseHandshake.lost`: the connection went away; nothing more is sent.

The socket owns the clock and the bytes (it arms the timer and writes the frame); nothing here
does I/O or reads a clock. The code we send is always one the wire allows
(:func:`sendable_close_code`), the reason cut to fit the frame on a character boundary
(:func:`~hybridrelay.protocol.websocket.close_payload`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridrelay.protocol.websocket import WIRE_CLOSE_CODES, close_payload

__all__ = ["CloseHandshake", "CloseStep", "sendable_close_code"]


def sendable_close_code(code: int | None) -> int:
    """A close code that may go into a close frame, for ``code`` received or meant
    (PROTOCOL.md 5.5): none or 1005 (no status) -> 1000, 1006 (lost) -> 1011, a code the wire
    does not allow -> 1011."""
    if code is None or code == 1005:
        return 1000
    if code in WIRE_CLOSE_CODES or 3000 <= code <= 4999:
        return code
    return 1011


@dataclass(frozen=True, slots=True)
class CloseStep:
    """What a socket does after one event of the handshake.

    Attributes:
        frame: the payload of our close frame to write now, or None.
        drop: close the connection now (both close frames went by, or the peer ran out of time).
        arm: start the close timer: the peer owes us its close frame (call
            :meth:`CloseHandshake.give_up` when it fires).
        news: the peer's close frame was not seen before (report it).
    """

    frame: bytes | None = None
    drop: bool = False
    arm: bool = False
    news: bool = False


_NOTHING = CloseStep()


@dataclass(slots=True)
class CloseHandshake:
    """One connection's close handshake (see the module's docstring).

    Attributes:
        sent: our close frame went out (or nothing more can be sent).
        received: the peer's close frame came in (or the connection is gone).
        dropped: the connection was told to drop (once) or is gone.
    """

    sent: bool = False
    received: bool = False
    dropped: bool = False
    #: The peer's close code and reason (1006 when the connection was lost without one).
    code: int | None = None
    reason: str = ""

    def send(self, code: int = 1000, reason: str = "") -> CloseStep:
        """We close our direction with ``code`` (made sendable) and ``reason``."""
        if self.sent or self.dropped:
            return _NOTHING
        self.sent = True
        frame = close_payload(sendable_close_code(code), reason)
        if self.received:
            self.dropped = True
            return CloseStep(frame=frame, drop=True)
        return CloseStep(frame=frame, arm=True)

    def receive(self, code: int | None, reason: str = "") -> CloseStep:
        """The peer's close frame (``code`` None: it carried no status, reported as 1005)."""
        if self.received or self.dropped:
            return _NOTHING
        self.received = True
        self.code = 1005 if code is None else code
        self.reason = reason
        if self.sent:
            self.dropped = True
            return CloseStep(drop=True, news=True)
        return CloseStep(news=True)

    @property
    def answer_code(self) -> int:
        """The code to answer the peer's close frame with (its own, when the wire allows it)."""
        return sendable_close_code(self.code)

    def give_up(self) -> CloseStep:
        """The close timer fired (the peer did not answer), or we drop the connection now
        without waiting: nothing more goes either way."""
        self.sent = self.received = True
        if self.dropped:
            return _NOTHING
        self.dropped = True
        return CloseStep(drop=True)

    def lost(self) -> CloseStep:
        """The connection is gone; ``news`` when no close frame had come from the peer."""
        news = not self.received
        if news:
            self.code, self.reason = 1006, ""
        self.sent = self.received = self.dropped = True
        return CloseStep(news=news)
