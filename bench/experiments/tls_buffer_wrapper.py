#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` with a 16 KiB asyncio TLS read buffer (default 256 KiB).

Use as ``BENCH_HYBRIDRELAY=bench/experiments/tls_buffer_wrapper.py python -m bench ...``.
"""

import asyncio.sslproto
import sys

asyncio.sslproto.SSLProtocol.max_size = 16 * 1024

from hybridrelay.cli.main import main  # noqa: E402

sys.exit(main())
