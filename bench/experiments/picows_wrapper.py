#!/usr/bin/env python3
"""A/B experiment: the SDK's picows client sockets with other settings (docs/DECISIONS.md D8).

Use as ``HYBRIDRELAY_WS_CLIENT=picows BENCH_HYBRIDRELAY=bench/experiments/picows_wrapper.py
python -m bench ...`` with any of:

* ``PICOWS_AFN=0|1``: aiofastnet transports off/on (picows' default: on);
* ``PICOWS_WRITE_HIGH=<bytes>``: write-buffer high-water mark (default: the transport's);
* ``PICOWS_READ_HIGH=<bytes>``: queued received bytes before reading pauses (low = 1/4);
* ``PICOWS_READ_INIT=<bytes>``: picows' initial read buffer (default 4096).
"""

import os
import sys

from hybridrelay.cli.main import main
from hybridrelay.transport import picows_ws

if "PICOWS_AFN" in os.environ:
    picows_ws._USE_AIOFASTNET = os.environ["PICOWS_AFN"] == "1"
if "PICOWS_WRITE_HIGH" in os.environ:
    picows_ws._WRITE_HIGH = int(os.environ["PICOWS_WRITE_HIGH"])
if "PICOWS_READ_HIGH" in os.environ:
    picows_ws._READ_HIGH = int(os.environ["PICOWS_READ_HIGH"])
    picows_ws._READ_LOW = picows_ws._READ_HIGH // 4

if "PICOWS_READ_INIT" in os.environ:
    picows_ws._READ_BUFFER_INIT = int(os.environ["PICOWS_READ_INIT"])

sys.exit(main())
