#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` with asyncio's stock TLS read buffers (one per connection).

``BENCH_HYBRIDRELAY=bench/experiments/tls_stock_buffer_wrapper.py python -m bench ...``: the
TLS read buffer is sized as before D16 (``SSLProtocol.max_size`` = 64 KiB, D6) but every
connection keeps its own, as the stdlib allocates it. Only the asyncio loop
(``HYBRIDRELAY_LOOP=asyncio``) uses these buffers; uvloop has its own.
"""

import asyncio.sslproto
import sys

import hybridrelay.cli.main as cli
from hybridrelay.transport.tuning import DEFAULT_TLS_READ_BUFFER


def _stock_buffer(size: int = DEFAULT_TLS_READ_BUFFER) -> None:
    asyncio.sslproto.SSLProtocol.max_size = size


cli.set_tls_read_buffer = _stock_buffer  # type: ignore[attr-defined]  # main() calls it by name
sys.exit(cli.main())
