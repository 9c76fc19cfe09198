#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` with another asyncio TLS read buffer size.

Use as ``BENCH_TLS_BUFFER=16384 BENCH_HYBRIDRELAY=bench/experiments/tls_buffer_wrapper.py
python -m bench ...`` (default 16 KiB; ``hybridrelay`` itself sets 64 KiB, Python 256 KiB).
The size is what the command line's ``set_tls_read_buffer`` call gets (D6, D16), so it only
matters on asyncio's loop (``HYBRIDRELAY_LOOP=asyncio``): uvloop has its own TLS layer.
"""

import os
import sys

import hybridrelay.cli.main as cli
from hybridrelay.transport.tuning import set_tls_read_buffer

SIZE = int(os.environ.get("BENCH_TLS_BUFFER", 16 * 1024))


def _sized(size: int = SIZE) -> None:
    set_tls_read_buffer(SIZE)


cli.set_tls_read_buffer = _sized  # type: ignore[attr-defined]  # main() calls it by name
sys.exit(cli.main())
