#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` with another asyncio TLS read buffer size.

Use as ``BENCH_TLS_BUFFER=16384 BENCH_HYBRIDRELAY=bench/experiments/tls_buffer_wrapper.py
python -m bench ...`` (default 16 KiB; ``hybridrelay`` itself sets 64 KiB, Python 256 KiB).
"""

import asyncio.sslproto
import os
import sys

asyncio.sslproto.SSLProtocol.max_size = int(os.environ.get("BENCH_TLS_BUFFER", 16 * 1024))

from hybridrelay.cli.main import main  # noqa: E402

sys.exit(main())
