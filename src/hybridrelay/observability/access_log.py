"""The relay's access log and its refusal log (docs/LOGGING.md).

* :class:`AccessLog`: one INFO line per relayed connection (when it ends) and per relayed HTTP
  request, on the logger ``hybridrelay.access``, with the tracking id, hybrid connection,
  outcome, duration and bytes. The fields also travel as the record's ``fields`` attribute, so
  the JSON format (``cli/logs.py``) writes them as keys of their own.
* :class:`RefusalLog`: one WARNING line per refused listener or sender with its status and
  reason, on ``hybridrelay.refused``, rate-limited per (kind, status) by a token bucket so a
  flood of bad tokens cannot fill a disk; the next line that gets through says how many were
  left out.

Neither ever takes a token or a key: callers pass the fields below only, and a reason (which
may come from a listener) is cleaned of anything shaped like a SAS token or key first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AccessLog", "RefusalLog", "TokenBucket", "redact"]

_SECRETS = re.compile(
    r"(SharedAccessSignature\s+\S+|sb-hc-token=[^&\s]*|sig=[^&\s]*|SharedAccessKey=[^;\s]*)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with anything shaped like a SAS token, signature or key replaced by ``***``."""
    return _SECRETS.sub("***", text)


def _fields_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)


class AccessLog:
    """One line per relayed connection and per relayed HTTP request."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("hybridrelay.access")

    def _write(self, event: str, fields: dict[str, Any]) -> None:
        self._logger.info(
            "%s %s", event, _fields_text(fields), extra={"fields": {"event": event, **fields}}
        )

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
    ) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        self._write(
            "connection",
            {
                "tracking_id": tracking_id,
                "hc": entity,
                "kind": kind,
                "outcome": "relayed",
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
        if not self._logger.isEnabledFor(logging.INFO):
            return
        self._write(
            "http",
            {
                "tracking_id": tracking_id,
                "hc": entity,
                "method": method,
                "status": status,
                "duration": round(duration, 3),
                "request_bytes": request_bytes,
                "response_bytes": response_bytes,
                "sender": sender,
            },
        )


@dataclass
class TokenBucket:
    """``burst`` events at once, then ``rate`` per second. Pure: the caller passes the time."""

    burst: float
    rate: float
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RefusalLog:
    """Refused listens and senders, rate-limited per (kind, status)."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: float = 20,
        rate: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger or logging.getLogger("hybridrelay.refused")
        self._burst = burst
        self._rate = rate
        self._clock = clock
        # Keyed by kind and status only (a handful of values), never by address or entity:
        # the table cannot grow with what clients send.
        self._buckets: dict[tuple[str, int], TokenBucket] = {}
        self._suppressed: dict[tuple[str, int], int] = {}

    def refused(self, kind: str, entity: str, status: int, reason: str, remote: str | None) -> None:
        key = (kind, status)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._burst, self._rate)
        if not bucket.take(self._clock()):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        left_out = self._suppressed.pop(key, 0)
        fields = {
            "kind": kind,
            "hc": entity,
            "status": status,
            "reason": redact(reason)[:200],
            "remote": remote,
        }
        if left_out:
            fields["suppressed"] = left_out
        self._logger.warning(
            "%s refused %s%s",
            kind,
            _fields_text(fields),
            f" ({left_out} similar refusals left out)" if left_out else "",
            extra={"fields": {"event": "refused", **fields}},
        )
