"""The access log of our HTTP listeners (observability/http_access.py): one uvicorn-style line
per request, the target's control characters written as ``?``."""

from __future__ import annotations

import datetime
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from hybridrelay.cli.logs import BatchedStreamHandler, JsonFormatter, TextFormatter
from hybridrelay.observability.http_access import access_logged

pytestmark = pytest.mark.timeout(10)


class Request:
    """What ``access_logged`` reads of a request context, and a handler's answer."""

    def __init__(self, target: str, status: int = 200) -> None:
        self.method = "GET"
        self.target = target
        self.remote_endpoint: tuple[str, int] | None = ("203.0.113.7", 52114)
        self.responded = False
        self.status = status
        self.bytes_sent = 0
        self.finished = False

    async def finish(self) -> None:
        self.finished = True


async def answer(ctx: Request) -> None:
    ctx.responded = True
    ctx.bytes_sent = 1532


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Records(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access() -> Iterator[tuple[logging.Logger, Lines]]:
    log = logging.getLogger("tests.http_access")
    lines = Lines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log, lines
    log.removeHandler(lines)


@pytest.mark.parametrize(
    ("target", "written"),
    [
        ("/api/items?page=2", "/api/items?page=2"),
        ("/api/\u00e9t\u00e9", "/api/\u00e9t\u00e9"),  # printable beyond ASCII stays
        ('/x\r\n2026-12-03 INFO forged: "GET /"', '/x??2026-12-03 INFO forged: "GET /"'),
        ("/a\x00b\x1b[31m\u2028", "/a?b?[31m?"),
    ],
    ids=["plain", "unicode", "line-break", "control"],
)
async def test_one_line_per_request_with_control_characters_replaced(
    access: tuple[logging.Logger, Lines], target: str, written: str
) -> None:
    log, lines = access
    ctx = Request(target)
    await access_logged(answer, log)(ctx)
    assert ctx.finished
    (line,) = lines.lines
    prefix = f'203.0.113.7:52114 - "GET {written}" 200 1532B '
    assert line.startswith(prefix) and line.endswith("ms"), line
    assert "\n" not in line and "\r" not in line


@pytest.mark.parametrize("kind", ["text", "json"])
async def test_the_line_written_past_logging_is_the_record_s_line(kind: str) -> None:
    """With the process's batched handler alone on the way, the line goes to it without a
    record (``emit_fields``): the same text, time and fields as logging's record makes."""
    formatter = TextFormatter() if kind == "text" else JsonFormatter()
    log = logging.getLogger(f"tests.http_access.{kind}")
    stream = io.StringIO()
    batched = BatchedStreamHandler(stream, interval=3600)
    batched.setFormatter(formatter)
    log.handlers[:] = [batched]
    log.setLevel(logging.INFO)
    log.propagate = False
    seen: list[logging.LogRecord] = []
    try:
        await access_logged(answer, log)(Request("/api/items?page=2"))
        batched.flush()
        (direct,) = stream.getvalue().splitlines()
        log.handlers[:] = [batched, Records(seen)]  # two handlers: logging's own way
        await access_logged(answer, log)(Request("/api/items?page=2"))
    finally:
        log.handlers[:] = []
        batched.close()
    (record,) = seen
    record.created = direct_time(direct, kind)
    record.msecs = int((record.created - int(record.created)) * 1000) + 0.0
    assert formatter.format(record) == direct.replace(_took(direct), _took(record.getMessage()))


def direct_time(line: str, kind: str) -> float:
    """The time a line was written at, read back from it (to the millisecond)."""
    if kind == "json":
        stamp = json.loads(line)["ts"]
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    else:
        stamp = " ".join(line.split(" ", 2)[:2])
        moment = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").astimezone()
    return moment.timestamp() + 0.0004  # inside its millisecond


def _took(text: str) -> str:
    """The duration at the end of a line (``12.4ms``), which differs between two requests."""
    return str(re.findall(r"\d+\.\dms", text)[-1])
