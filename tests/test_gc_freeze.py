"""``freeze_startup_objects`` (transport/tuning.py): what exists after start-up leaves the
garbage collector's walks, what comes later is still collected; the bridge and serve-app
commands and the relay call it before they run."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridrelay.cli import main as cli_main

PROGRAM = """
import gc
import hybridrelay.cli.main
from hybridrelay.transport.tuning import freeze_startup_objects
walked = len(gc.get_objects())
freeze_startup_objects()
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after start-up: still garbage the collector finds
del a, b
print(walked, len(gc.get_objects()), gc.get_freeze_count(), gc.collect())
"""


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    walked, walked_after, frozen, collected = map(int, result.stdout.split())
    assert walked > 10_000  # the package and its dependencies: what a full collection walked
    assert walked_after < walked // 10
    assert frozen >= walked // 2
    assert collected >= 2


@pytest.mark.parametrize("command", ["bridge", "serve-app", "serve"])
def test_the_long_running_commands_freeze_their_startup_objects(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli_main, "freeze_startup_objects", lambda: calls.append("freeze"))

    def run(coro: Any) -> int:
        coro.close()
        calls.append("run")
        return 0

    monkeypatch.setattr(asyncio, "run", run)  # what the commands run their coroutine with
    if command == "serve":
        args = cli_main.build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
        assert cli_main._cmd_serve(args) == 0
    else:
        handler = cli_main._cmd_bridge if command == "bridge" else cli_main._cmd_serve_app
        assert handler(argparse.Namespace()) == 0
    assert calls == ["freeze", "run"]
