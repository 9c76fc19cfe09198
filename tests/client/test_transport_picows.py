"""The picows client socket (``HYBRIDRELAY_WS_CLIENT=picows``, docs/DECISIONS.md D8): what only
picows has, its selection and the fallback when it is not installed.

Its contract (the SDK's end-to-end scenarios with picows selected, and the socket against a
small aiohttp server) is in tests/client/test_client_sockets.py, run for picows and for our own
client socket alike.
"""

from __future__ import annotations

import logging
import sys

import pytest

pytest.importorskip("picows")

from hybridrelay.client import _connect
from hybridrelay.transport import picows_ws  # noqa: F401  (the fallback test unloads it)
from tests.client.ws_peers import selected_for


def test_selection_falls_back_to_the_default_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "picows", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "hybridrelay.transport.picows_ws")
    with caplog.at_level(logging.WARNING, logger="hybridrelay.client"):
        assert selected_for(monkeypatch, "picows") == _connect.DEFAULT_WS_CLIENT
        assert _connect.ws_client() == _connect.DEFAULT_WS_CLIENT
    assert len([r for r in caplog.records if "not installed" in r.getMessage()]) == 1


def test_selection_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert selected_for(monkeypatch, "picows") == "picows"
    assert selected_for(monkeypatch, None) == "frames"
