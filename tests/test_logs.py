"""The batched log writer of our processes (cli/logs.py)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from hybridrelay.cli.logs import BATCH_LIMIT, BatchedStreamHandler

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
