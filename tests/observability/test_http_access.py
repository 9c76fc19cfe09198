"""The access log of our HTTP listeners (observability/http_access.py): one uvicorn-style line
per request, the target's control characters written as ``?``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

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
