"""Reconnect policy of the listener: the delay schedule and which errors are worth a retry.

Pure: no I/O and no clock; randomness comes from an injectable :class:`random.Random`.
The schedule is the one of .NET and hyco-https (PROTOCOL.md 4.5): 0, 1, 2, 5, 10, 30 s, then
30 s forever, each delay jittered by ±20 % so that many listeners cut off by one relay restart
do not come back in lock-step. The first retry, 0 s in the schedule, is drawn in
[0, FIRST_RETRY_SPREAD): ±20 % of nothing is nothing, and the listeners of a node that died
would all hit the surviving nodes in the same millisecond (docs/SCALING.md, the reconnect
storm). With several endpoints (a cluster's nodes) an attempt tries the others in a random
order (:func:`endpoint_round`), so that those listeners do not all land on the node after it
in the list.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator, Sequence

from hybridrelay.exceptions import (
    AuthorizationError,
    CertificateError,
    ConfigurationError,
    EndpointNotFoundError,
    QuotaExceededError,
    RelayError,
    RelayHttpError,
    StreamClosedError,
    TokenError,
)

__all__ = [
    "FIRST_RETRY_SPREAD",
    "JITTER",
    "RECONNECT_DELAYS",
    "RetryKind",
    "capped_delay",
    "classify_error",
    "endpoint_round",
    "failure_cause",
    "needs_a_fix",
    "reconnect_delays",
]

RECONNECT_DELAYS: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
JITTER = 0.2
#: Seconds over which an immediate (0 s) retry is spread when there is jitter (at most the
#: schedule's longest delay: a schedule shortened for a test stays short).
FIRST_RETRY_SPREAD = 0.5


def _jittered(delay: float, rng: random.Random, jitter: float, spread: float = 0.0) -> float:
    if delay == 0.0 and jitter > 0.0:
        return rng.uniform(0.0, spread)
    return delay * rng.uniform(1.0 - jitter, 1.0 + jitter)


def reconnect_delays(
    rng: random.Random | None = None,
    *,
    schedule: Sequence[float] = RECONNECT_DELAYS,
    jitter: float = JITTER,
) -> Iterator[float]:
    """Yield the delays before reconnect attempts 1, 2, 3, ... forever.

    After the schedule is used up its last entry repeats (the cap). Start a new generator
    after a successful connect to reset the schedule.
    """
    if not schedule:
        raise ValueError("schedule must not be empty")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    rng = rng if rng is not None else random.Random()
    spread = min(FIRST_RETRY_SPREAD, max(schedule))
    for delay in schedule:
        yield _jittered(delay, rng, jitter, spread)
    while True:
        yield _jittered(schedule[-1], rng, jitter, spread)


def capped_delay(
    rng: random.Random | None = None,
    *,
    schedule: Sequence[float] = RECONNECT_DELAYS,
    jitter: float = JITTER,
) -> float:
    """The capped (longest) delay, jittered: used after errors a quick retry cannot fix."""
    return _jittered(schedule[-1], rng if rng is not None else random.Random(), jitter)


def endpoint_round(current: int, count: int, rng: random.Random) -> list[int]:
    """The endpoints (of ``count``) one reconnect attempt tries, in turn, after losing
    ``current``: the others in random order, so that the listeners of a node that died
    spread over all the rest and a listener does not wait a backoff step for each dead one
    (a machine's workers die together), then ``current`` last."""
    others = [index for index in range(count) if index != current]
    rng.shuffle(others)
    return [*others, current]


class RetryKind(enum.Enum):
    """What a reconnect loop should do after an error."""

    #: transient (network, timeout, 5xx): follow the schedule
    BACKOFF = "backoff"
    #: needs a change elsewhere (401/403/404, quota, token source, a certificate not trusted):
    #: retry at the capped interval
    CAPPED = "capped"
    #: retrying cannot help (bad configuration, closed by us): stop
    FATAL = "fatal"


def classify_error(exc: BaseException) -> RetryKind:
    """Classify an error raised by a connect attempt or a broken connection."""
    if isinstance(exc, ConfigurationError | StreamClosedError):
        return RetryKind.FATAL
    if isinstance(exc, AuthorizationError | EndpointNotFoundError | QuotaExceededError):
        return RetryKind.CAPPED
    if isinstance(exc, CertificateError | TokenError):
        return RetryKind.CAPPED
    if isinstance(exc, RelayError):
        return RetryKind.BACKOFF
    if isinstance(exc, Exception):
        # Something unexpected (a bug in a user's token provider, say): never a tight loop.
        return RetryKind.CAPPED
    return RetryKind.FATAL  # CancelledError, KeyboardInterrupt, SystemExit


def needs_a_fix(exc: BaseException) -> bool:
    """The relay refuses the credentials (401/403), does not know the hybrid connection (404),
    or its certificate is not accepted: retrying cannot help until someone changes the key, the
    rule, the name or the CA. At start a bridge or ``serve-app`` exits on these; once it has
    been online it logs them at ERROR and keeps retrying at the capped interval (a rotated key
    may be put back)."""
    return isinstance(exc, AuthorizationError | EndpointNotFoundError | CertificateError)


def failure_cause(exc: BaseException) -> str:
    """What makes two failures "the same cause" in a retry loop's log: the status of a refusal
    (its reason phrase carries a new TrackingId every time), else the message."""
    if isinstance(exc, RelayHttpError):
        return f"{type(exc).__name__} {exc.status}"
    return f"{type(exc).__name__} {exc}"
