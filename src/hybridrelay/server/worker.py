"""One worker of ``hybridrelay serve --workers N`` (docs/CLUSTER.md, "Workers on one machine").

The N workers share the relay's port (and the ``ingress:`` ports) through SO_REUSEPORT: the
kernel hands each new connection to any of them. A rendezvous address must reach the worker
that holds the sender, so each worker also listens on a port of its own and names that port in
the rendezvous addresses it hands out (to its own listeners and, through Redis, to other
nodes'). Each worker is a full cluster node: its own node id, lease and node channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server.config import RelayConfig

__all__ = ["WORKER_ENV", "WorkerRole", "with_port", "worker_index"]

#: Set by the supervisor in each worker's environment: the worker's index (0 .. N-1).
WORKER_ENV = "HYBRIDRELAY_WORKER"


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker ``index`` of ``config.server.workers``."""

    index: int
    #: The port of its own to bind (0: any free port).
    own_port: int
    #: Its management listener's port: ``management.port + index`` (0: any free port).
    management_port: int

    @classmethod
    def of(cls, config: RelayConfig, index: int) -> WorkerRole:
        server, management = config.server, config.management
        return cls(
            index=index,
            own_port=server.worker_port + index if server.worker_port else 0,
            management_port=management.port + index if management.port else 0,
        )


def worker_index(config: RelayConfig) -> int | None:
    """This process's worker index (from :data:`WORKER_ENV`, set by the supervisor); None
    when it is not a worker (``server.workers`` is 1, or this is the supervisor).

    Raises:
        ConfigurationError: the variable is not an index below ``server.workers``.
    """
    text = os.environ.get(WORKER_ENV)
    if text is None or config.server.workers == 1:
        return None
    if not text.isdigit() or int(text) >= config.server.workers:
        raise ConfigurationError(
            f"${WORKER_ENV}={text!r} is not a worker index below server.workers "
            f"({config.server.workers}): unset it (the supervisor sets it)"
        )
    return int(text)


def with_port(base: str, port: int) -> str:
    """``base`` (``scheme://host[:port][/path]``) with its port replaced by ``port``."""
    parts = urlsplit(base.rstrip("/"))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
