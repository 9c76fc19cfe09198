#!/usr/bin/env python3
"""A/B experiment: run ``hybridrelay`` on uvloop.

Use as ``BENCH_HYBRIDRELAY=bench/experiments/uvloop_wrapper.py python -m bench ...``.
"""

import sys

import uvloop

from hybridrelay.cli.main import main

uvloop.install()
sys.exit(main())
