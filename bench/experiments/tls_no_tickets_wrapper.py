#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` with a relay that issues no TLS 1.3 session tickets.

``BENCH_HYBRIDRELAY=bench/experiments/tls_no_tickets_wrapper.py python -m bench ...``: the
relay's server contexts get ``num_tickets = 0`` (OpenSSL sends 2 per handshake by default).
Every process of the path runs through this wrapper; only the relay's contexts change.
"""

import ssl
import sys

from hybridrelay.cli.main import main
from hybridrelay.server.app import RelayServer
from hybridrelay.server.config import TlsConfig

_make = RelayServer._tls_context


def _no_tickets(tls: TlsConfig) -> ssl.SSLContext:
    context = _make(tls)
    context.num_tickets = 0
    return context


RelayServer._tls_context = staticmethod(_no_tickets)  # type: ignore[method-assign]
sys.exit(main())
