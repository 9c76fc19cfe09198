"""The relay's access log and its refusal log (reference: docs/LOGGING.md).

* :class:`AccessLog`: one INFO line per relayed connection (when it ends) and per relayed HTTP
  request, on the logger ``hybridrelay.access``, with the tracking id, hybrid connection,
  outcome, duration and bytes. The fields also travel as the record's ``fields`` attribute, so
  the JSON format (``cli/logs.py``) writes them as keys of their own.
* :class:`RefusalLog`: one WARNING line per refused listener or sender with its status and
  reason, on ``hybridrelay.refused``, rate-limited per (kind, status) by a :class:`TokenBucket`
  so a flood of bad tokens cannot fill a disk; the next line that gets through for that kind and
  status (or :meth:`RefusalLog.report_suppressed`) says how many were left out.

Neither ever takes a token or a key: callers pass the fields below only, and the text a client
or a listener can choose (a refusal's reason, the entity it named) is cleaned of anything shaped
like a SAS token, signature or key first (:func:`redact`). In text format a value with a line
break or another control character is quoted as a JSON string, so a reason cannot forge a log
line of its own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["MAX_REFUSAL_KEYS", "AccessLog", "RefusalLog", "TokenBucket", "only_handler", "redact"]

# A token is "SharedAccessSignature sr=..&sig=..&se=..&skn=.." in a header, and URL-encoded
# ("%20", "+", "%3D", "%26") in a query; a connection string carries "SharedAccessKey=...".
# Over-redacting the text after a match is harmless; missing part of a signature is not.
_SECRETS = re.compile(
    r"SharedAccessSignature(?:\s|%20|\+)+\S*"
    r"|sb-hc-token(?:=|%3D)(?:SharedAccessSignature(?:\s|%20|\+)+)?[^&\s]*"
    r"|sig(?:=|%3D)[^&\s]*"
    r"|SharedAccessKey(?:=|%3D)[^;\s]*",
    re.IGNORECASE,
)
#: What a secret is replaced with.
REDACTED = "***"
#: The longest reason written (a listener's reason is its own text).
MAX_REASON = 200
#: More (kind, status) pairs than this share one bucket: the callers' kinds and statuses are a
#: handful, so this only bounds the table against a caller that passes something unexpected.
MAX_REFUSAL_KEYS = 64
_OVERFLOW_KEY = ("other", 0)


def redact(text: str) -> str:
    """``text`` with anything shaped like a SAS token, signature or key replaced by ``***``."""
    return _SECRETS.sub(REDACTED, text)


def _value_text(value: Any) -> str:
    text = str(value)
    # Only text with a line break or another control character is quoted: plain words stay
    # as operators read (and grep) them, and nothing can end the line and forge one.
    return text if text.isprintable() else json.dumps(text)


def _printable(text: str) -> str:
    return text if text.isprintable() else json.dumps(text)


def _fields_text(fields: dict[str, Any]) -> str:
    # Written once per relayed request: the common kinds skip _value_text's call (a number's
    # text is always printable; so is most text), the rest take it. The same text either way.
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        kind = type(value)
        if kind is int or kind is float or (kind is str and value.isprintable()):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={_value_text(value)}")
    return " ".join(parts)


class FieldsSink(Protocol):
    """A handler that writes a record's line from its parts, without the record
    (:class:`hybridrelay.cli.logs.BatchedStreamHandler`)."""

    def emit_fields(
        self, levelno: int, logger: str, message: str, fields: dict[str, Any]
    ) -> bool: ...


def only_handler(logger: logging.Logger) -> FieldsSink | None:
    """The one handler a record of ``logger`` would reach, if that is a :class:`FieldsSink`
    and nothing on the way filters (then writing the line to it is what logging would do);
    else None. Looked at per line, so a handler added later (a test's, an embedding
    application's) gets every record as before."""
    found: Any = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        for handler in node.handlers:
            if found is not None:
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    return found if hasattr(found, "emit_fields") else None


class AccessLog:
    """One INFO line per relayed connection and per relayed HTTP request."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("hybridrelay.access")

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        self._emit(f"{event} {_fields_text(fields)}", {"event": event, **fields})

    def _emit(self, message: str, extra: dict[str, Any]) -> None:
        sink = only_handler(self._logger)
        if sink is not None and sink.emit_fields(logging.INFO, self._logger.name, message, extra):
            return
        self._logger.info("%s", message, extra={"fields": extra})

    def connection(
        self,
        tracking_id: str,
        entity: str,
        *,
        kind: str,
        duration: float,
        bytes_to_listener: int,
        bytes_to_sender: int,
        sender: str | None,
        listener: str | None,
        outcome: str = "relayed",
    ) -> None:
        """A relayed connection ended: ``kind`` ``websocket`` or ``ingress``, ``duration`` in
        seconds, the bytes each way, the peers' addresses (None when unknown)."""
        # Checked before the fields are gathered: at --log-level warning this costs one call.
        if not self._logger.isEnabledFor(logging.INFO):
            return
        self._write(
            "connection",
            {
                "tracking_id": tracking_id,
                "hc": entity,
                "kind": kind,
                "outcome": outcome,
                "duration": round(duration, 3),
                "bytes_to_listener": bytes_to_listener,
                "bytes_to_sender": bytes_to_sender,
                "sender": sender,
                "listener": listener,
            },
        )

    def http_request(
        self,
        tracking_id: str,
        entity: str,
        *,
        method: str,
        status: int,
        duration: float,
        request_bytes: int | None,
        response_bytes: int | None,
        sender: str | None,
    ) -> None:
        """A relayed HTTP request was answered with ``status``; a size is None when unknown
        (a chunked body)."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        duration = round(duration, 3)
        # _fields_text of these fields written out for their types (one line per relayed
        # request: the loop over the fields showed in the relay's profile). The same text;
        # a test compares.
        # One check for the three texts that are printable but for a caller's surprise.
        shown = (tracking_id, entity, method)
        if not "".join(shown).isprintable():
            shown = (_printable(tracking_id), _printable(entity), _printable(method))
        text = (
            f"http tracking_id={shown[0]} hc={shown[1]} method={shown[2]} status={status}"
            f" duration={duration}"
        )
        if request_bytes is not None:
            text += f" request_bytes={request_bytes}"
        if response_bytes is not None:
            text += f" response_bytes={response_bytes}"
        if sender is not None:
            text += f" sender={_printable(sender)}"
        extra = {
            "event": "http",
            "tracking_id": tracking_id,
            "hc": entity,
            "method": method,
            "status": status,
            "duration": duration,
            "request_bytes": request_bytes,
            "response_bytes": response_bytes,
            "sender": sender,
        }
        self._emit(text, extra)


@dataclass
class TokenBucket:
    """``burst`` events at once, then ``rate`` per second. Pure: the caller passes the time
    (any clock that does not go backwards; a step back is taken as no time passed)."""

    burst: float
    rate: float
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.burst < 1 or self.rate < 0:
            raise ValueError(
                f"a token bucket needs burst >= 1 and rate >= 0, not {self.burst}, {self.rate}"
            )
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Spend one token if there is one (True), else False."""
        if self.updated is not None:
            elapsed = max(0.0, now - self.updated)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _Refusals:
    """One (kind, status)'s bucket, and what it left out since its last line."""

    bucket: TokenBucket
    last_line: float
    suppressed: int = 0


class RefusalLog:
    """Refused listens and senders as WARNING lines, rate-limited per (kind, status): a burst
    of ``burst`` lines, then ``rate`` a second."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: float = 20,
        rate: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger or logging.getLogger("hybridrelay.refused")
        TokenBucket(burst, rate)  # the bounds are checked now, not at the first refusal
        self._burst = burst
        self._rate = rate
        self._clock = clock
        # Keyed by kind and status only (a handful of values), never by address or entity:
        # the table cannot grow with what clients send.
        self._table: dict[tuple[str, int], _Refusals] = {}

    def refused(self, kind: str, entity: str, status: int, reason: str, remote: str | None) -> None:
        """A ``kind`` (``listen``, ``connect``, ``http``, ``ingress``) refused with ``status``
        for ``reason``; ``remote`` is the peer's address when known."""
        if not self._logger.isEnabledFor(logging.WARNING):
            return
        now = self._clock()
        key = (kind, status)
        if key not in self._table and len(self._table) >= MAX_REFUSAL_KEYS:
            key = _OVERFLOW_KEY
        entry = self._table.get(key)
        if entry is None:
            entry = self._table[key] = _Refusals(TokenBucket(self._burst, self._rate), now)
        if not entry.bucket.take(now):
            entry.suppressed += 1
            return
        fields: dict[str, Any] = {
            "hc": redact(entity),
            "status": status,
            "reason": redact(reason)[:MAX_REASON],
            "remote": remote,
        }
        self._write(kind, fields, self._take_suppressed(entry, now), "refused")

    def report_suppressed(self) -> int:
        """Write one line per (kind, status) whose refusals were left out since its last line,
        and return how many were: call it now and then (and before exit), so the count of a
        flood that stopped is told even though no further refusal of its kind comes."""
        now = self._clock()
        total = 0
        for (kind, status), entry in self._table.items():
            if entry.suppressed:
                total += entry.suppressed
                counted = self._take_suppressed(entry, now)
                self._write(kind, {"status": status}, counted, "refusals_suppressed")
        return total

    def _write(
        self, kind: str, fields: dict[str, Any], counted: dict[str, Any], event: str
    ) -> None:
        note = ""
        if counted:
            note = (
                f" ({counted['suppressed']} similar refusals suppressed in the last "
                f"{counted['suppressed_seconds']:.1f}s)"
            )
        self._logger.warning(
            "%s refused %s%s",
            kind,
            _fields_text(fields),
            note,
            extra={"fields": {"event": event, "kind": kind, **fields, **counted}},
        )

    @staticmethod
    def _take_suppressed(entry: _Refusals, now: float) -> dict[str, Any]:
        """``entry``'s count of left-out refusals and the seconds they were counted over (empty
        when none were), reset: a line that says so is being written now."""
        left_out, window = entry.suppressed, max(0.0, now - entry.last_line)
        entry.suppressed = 0
        entry.last_line = now
        if not left_out:
            return {}
        return {"suppressed": left_out, "suppressed_seconds": round(window, 1)}
