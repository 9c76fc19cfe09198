"""The reconnect storm of a cluster node's death: a real run and a model (docs/SCALING.md).

``python3 -m bench.reconnect_storm real`` and ``python3 -m bench.reconnect_storm model``; see
:mod:`bench.reconnect_storm.__main__`.
"""
