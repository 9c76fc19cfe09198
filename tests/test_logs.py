"""The batched log writer of our processes (cli/logs.py)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from hybridrelay.cli.logs import BATCH_LIMIT, LOG_FORMAT, BatchedStreamHandler, configure_logging

pytestmark = pytest.mark.timeout(10)


class RecordingStream(io.StringIO):
    """Counts its writes and signals each one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = threading.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        result = super().write(text)
        self.written.set()
        return result


@pytest.fixture
def stream() -> RecordingStream:
    return RecordingStream()


@pytest.fixture
def logger(stream: RecordingStream) -> Iterator[tuple[logging.Logger, BatchedStreamHandler]]:
    handler = BatchedStreamHandler(stream, interval=0.05)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.batched")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)
    handler.close()


def test_info_lines_are_written_together_soon_after(
    stream: RecordingStream, logger: tuple[logging.Logger, BatchedStreamHandler]
) -> None:
    log, _ = logger
    for i in range(100):
        log.info("connection %d closed", i)
    assert stream.written.wait(5)
    handler_lock = logger[1].lock
    assert handler_lock is not None
    with handler_lock:  # the writer thread is done with this batch
        text = stream.getvalue()
    assert text.splitlines()[:2] == ["INFO connection 0 closed", "INFO connection 1 closed"]
    assert stream.writes < 100  # not one write per line


def test_a_warning_is_written_at_once_with_what_came_before(
    stream: RecordingStream, logger: tuple[logging.Logger, BatchedStreamHandler]
) -> None:
    log, _ = logger
    log.info("before")
    log.warning("trouble")
    assert stream.getvalue() == "INFO before\nWARNING trouble\n"


def test_a_full_batch_is_written_at_once(
    stream: RecordingStream, logger: tuple[logging.Logger, BatchedStreamHandler]
) -> None:
    log, _ = logger
    log.info("x" * BATCH_LIMIT)
    assert stream.getvalue().startswith("INFO xxx")


def test_close_writes_what_is_pending(stream: RecordingStream) -> None:
    handler = BatchedStreamHandler(stream, interval=3600)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(logging.makeLogRecord({"msg": "last words", "levelno": logging.INFO}))
    assert stream.getvalue() == ""
    handler.close()
    assert stream.getvalue() == "last words\n"


def test_a_closed_stream_does_not_break_logging() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=3600)
    stream.close()
    handler.handle(logging.makeLogRecord({"msg": "lost", "levelno": logging.ERROR}))
    handler.close()


@pytest.fixture
def bare_root() -> Iterator[logging.Logger]:
    """The root logger, its handlers and levels restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    hybridrelay = logging.getLogger("hybridrelay")
    saved_hybridrelay = hybridrelay.level
    try:
        yield root
    finally:
        for handler in root.handlers:
            if isinstance(handler, BatchedStreamHandler):
                handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        hybridrelay.setLevel(saved_hybridrelay)


def test_configure_logging_is_the_one_setup(bare_root: logging.Logger) -> None:
    bare_root.handlers = []  # pytest's capture handlers are added around the test itself
    configure_logging("debug")
    (handler,) = bare_root.handlers
    assert isinstance(handler, BatchedStreamHandler)
    assert handler.formatter is not None and handler.formatter._fmt == LOG_FORMAT
    assert bare_root.level == logging.DEBUG
    # Again (the bridge's scope): the handler stays the one, only the named logger's level moves.
    configure_logging("warning", logger="hybridrelay")
    assert bare_root.handlers == [handler]
    assert bare_root.level == logging.DEBUG
    assert logging.getLogger("hybridrelay").level == logging.WARNING
    with pytest.raises(KeyError):
        configure_logging("chatty")


def test_every_command_takes_the_same_log_levels() -> None:
    from hybridrelay.cli.main import build_parser

    for command in (["serve"], ["bridge"], ["serve-app", "pkg:app"]):
        args = build_parser().parse_args([*command, "--log-level", "critical"])
        assert args.log_level == "critical"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--log-level", "chatty"])
