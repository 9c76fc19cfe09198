"""The ``hybridrelay bridge`` command line: options, exit codes, signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from hybridrelay.cli.bridge import add_bridge_arguments, build_config, run_bridge
from hybridrelay.exceptions import ConfigurationError
from tests.bridge.helpers import tcp_server
from tests.conftest import Relay


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridrelay bridge")
    add_bridge_arguments(parser)
    return parser.parse_args(list(argv))


CS = "Endpoint=sb://relay.example.com/;SharedAccessKeyName=n;SharedAccessKey=secretkey"


def test_options_map_to_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDRELAY_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_BRIDGE_CONNECTIONSTRING", raising=False)
    config_file = tmp_path / "bridge.yaml"
    config_file.write_text("keep_alive_interval: 5\nlocal_forwards: ['1:a']\n")
    config = build_config(
        parse(
            "-x",
            CS,
            "-f",
            str(config_file),
            "-L",
            "2/ssh:b",
            "-R",
            "c:localhost:3",
            "-T",
            "d:localhost:4",
            "-a",
            "7",
            "--proxy",
            "http://proxy:3128",
            "--log-level",
            "debug",
            "--shutdown-grace-period",
            "0",
        )
    )
    assert [str(f.spec) for f in config.local_forwards] == ["1:a", "2/ssh:b"]
    assert [str(f.spec) for f in config.remote_forwards] == ["c:localhost:3", "d:localhost:4"]
    assert config.keep_alive_interval == 7.0
    assert config.shutdown_grace_period == 0.0
    assert config.connection.proxy == "http://proxy:3128"
    assert config.connection.key == "secretkey"
    assert config.log_level == "debug"


def test_connection_string_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDRELAY_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_BRIDGE_CONNECTIONSTRING", CS)
    config = build_config(parse("-L", "1:a"))
    assert config.connection.endpoint == "sb://relay.example.com/"
    # -e and -s override parts of it.
    config = build_config(parse("-L", "1:a", "-x", CS, "-s", "SharedAccessSignature sr=a&sig=b"))
    assert config.connection.token == "SharedAccessSignature sr=a&sig=b"
    assert config.connection.key is None


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDRELAY_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_BRIDGE_CONNECTIONSTRING", raising=False)
    with pytest.raises(ConfigurationError, match="nothing to do"):
        build_config(parse("-x", CS))
    with pytest.raises(ConfigurationError, match="no relay endpoint"):
        build_config(parse("-L", "1:a"))
    with pytest.raises(SystemExit):
        parse("-a", "0")


async def test_bad_spec_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_bridge(parse("-x", CS, "-L", "nonsense")) == 2
    err = capsys.readouterr().err
    assert "-L 'nonsense'" in err
    assert "secretkey" not in err


class _Started(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "bridge: all forwards are up":
            self.event.set()


async def test_sigterm_shuts_down_cleanly(relay: Relay) -> None:
    started = _Started()
    logger = logging.getLogger("hybridrelay.bridge")
    logger.addHandler(started)
    try:
        async with tcp_server() as dest:
            args = parse(
                "-x",
                relay.connection_string(),
                "-L",
                "0:hc",
                "-R",
                f"hc:127.0.0.1:{dest.port}",
                "--shutdown-grace-period",
                "1",
            )
            task = asyncio.create_task(run_bridge(args))
            try:
                async with asyncio.timeout(20):
                    await started.event.wait()
                os.kill(os.getpid(), signal.SIGTERM)
                async with asyncio.timeout(20):
                    assert await task == 0
            finally:
                if not task.done():
                    task.cancel()
                await asyncio.wait([task])
    finally:
        logger.removeHandler(started)
    # Our handler was removed again.
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
