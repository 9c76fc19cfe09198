"""The log output of our processes (cli/logs.py, docs/LOGGING.md): the batched writer, the
text and JSON formats, and ``hybridrelay serve --log-format json`` as a real subprocess."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay import HybridConnectionClient, HybridConnectionListener
from hybridrelay.cli.logs import (
    BATCH_LIMIT,
    LOG_FORMAT,
    LOG_FORMAT_ENV,
    BatchedStreamHandler,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    install_batched_stderr,
)

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


def test_every_command_takes_the_same_log_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridrelay.cli.main import build_parser

    monkeypatch.delenv(LOG_FORMAT_ENV, raising=False)
    for command in (["serve"], ["bridge"], ["serve-app", "pkg:app"]):
        assert build_parser().parse_args(command).log_format == "text"
        assert build_parser().parse_args([*command, "--log-format", "json"]).log_format == "json"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--log-format", "yaml"])
    monkeypatch.setenv(LOG_FORMAT_ENV, "json")
    assert build_parser().parse_args(["serve"]).log_format == "json"
    assert build_parser().parse_args(["serve", "--log-format", "text"]).log_format == "text"
    # A wrong default is a usage error too, not quietly text.
    monkeypatch.setenv(LOG_FORMAT_ENV, "yaml")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bridge"])


def test_install_takes_the_format(bare_root: logging.Logger) -> None:
    bare_root.handlers = []
    with pytest.raises(ValueError):
        install_batched_stderr("yaml")
    assert bare_root.handlers == []
    install_batched_stderr("json")
    (handler,) = bare_root.handlers
    assert isinstance(handler.formatter, JsonFormatter)


def record(message: str, *args: object, **attributes: object) -> logging.LogRecord:
    made = logging.LogRecord(
        "hybridrelay.server", logging.WARNING, __file__, 1, message, args, None
    )
    made.__dict__.update(attributes)
    return made


#: Where fromtimestamp's rounding to the microsecond carries into the next millisecond, second
#: or day, half a microsecond each way (half to even), and before the epoch.
_STAMP_EDGES = (
    0.0,
    1.9999995,
    1.9999996,
    1.0000005,
    1764806399.9999996,
    1764806399.9995,
    -0.0000004,
    -1.5,
    -86400.9999996,
)
_ONE_JSON_FORMATTER = JsonFormatter()


def test_a_json_line_has_the_keys_the_docs_name() -> None:
    stamp = datetime.datetime(2026, 12, 2, 19, 57, 8, 921_000, tzinfo=datetime.UTC).timestamp()
    fields = {
        "event": "refused",
        "status": 401,
        "level": "forged",
        "when": datetime.date(2026, 1, 2),
    }
    line = JsonFormatter().format(record("refused %s", "listen", created=stamp, fields=fields))
    assert json.loads(line) == {
        "ts": "2026-12-02T19:57:08.921Z",
        "level": "warning",  # a field never replaces a key of the record's own
        "logger": "hybridrelay.server",
        "message": "refused listen",
        "event": "refused",
        "status": 401,
        "when": "2026-01-02",  # what json cannot write is written as text, not lost
    }


def test_a_json_line_carries_the_exception_and_stays_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    made = record("line one\nline two \u2028 and \x85 more", exc_info=exc_info)
    made.stack_info = "Stack (most recent call last):\n  here"
    line = JsonFormatter().format(made)
    assert len(line.splitlines()) == 1  # str.splitlines also splits at U+2028 and U+0085
    document = json.loads(line)
    assert document["message"] == "line one\nline two \u2028 and \x85 more"
    assert document["exc"].startswith("Traceback") and "RuntimeError: boom" in document["exc"]
    assert document["stack"].endswith("here")


@pytest.mark.timeout(30)
@given(created=st.floats(min_value=-2e9, max_value=5e9) | st.sampled_from(_STAMP_EDGES))
def test_a_json_line_s_time_is_datetime_s_own(created: float) -> None:
    """The formatter makes the text to the second once a second: the text is still
    ``datetime``'s to the millisecond, its rounding included (one formatter for every example,
    so its remembered second is another example's, older or newer)."""
    made = logging.LogRecord("hybridrelay.access", logging.INFO, "", 0, "http", (), None)
    made.created = created
    expected = datetime.datetime.fromtimestamp(created, datetime.UTC)
    ts = expected.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert json.loads(_ONE_JSON_FORMATTER.format(made))["ts"] == ts


# -- hybridrelay serve --log-format json, as a subprocess --------------------------------------

CLI = [sys.executable, "-m", "hybridrelay"]
_RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def connection_string(env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *CLI, "connection-string", "--entity", "demo", stdout=asyncio.subprocess.PIPE, env=env
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0
    return out.decode().strip()


@pytest.mark.timeout(90)
async def test_serve_writes_json_lines_with_access_and_refusal_lines(tmp_path: Path) -> None:
    env = {**os.environ, "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data")}
    env.pop(LOG_FORMAT_ENV, None)
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        "--log-format",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    # Read as it comes: a full pipe would stall the relay.
    stderr = asyncio.create_task(process.stderr.read())
    try:
        async with asyncio.timeout(20):
            while True:  # readiness is the "listening on" line, as in tests/test_cli.py
                line = (await process.stdout.readline()).decode()
                assert line, "serve exited before it was ready"
                if "relay listening on" in line:
                    base_url = line.rsplit(" ", 1)[1].strip()
                    break
        cs = await connection_string(env)
        async with asyncio.timeout(30):
            # One relayed connection: 2 bytes to the listener, 3 back.
            async with HybridConnectionListener.from_connection_string(cs) as listener:
                client = HybridConnectionClient.from_connection_string(cs)
                stream = await client.create_connection()
                accepted = await listener.accept_connection()
                assert accepted is not None
                await stream.write(b"hi")
                assert await accepted.read() == b"hi"
                await accepted.write(b"hey")
                assert await stream.read() == b"hey"
                await asyncio.gather(stream.aclose(), accepted.aclose())
                await client.aclose()
            # One refused listener, its (bad) token in the URL.
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(
                        f"{base_url}/$hc/demo?sb-hc-action=listen&sb-hc-token="
                        "SharedAccessSignature%20sr%3Dx%26sig%3Dnotasecretsig%26se%3D1%26skn%3Dr"
                    )
                assert refused.value.status == 401
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()
    assert process.returncode == 0
    text = (await stderr).decode()
    documents = [json.loads(line) for line in text.splitlines()]  # every line is one object
    assert documents
    for document in documents:
        assert {"ts", "level", "logger", "message"} <= document.keys(), document
        assert _RFC3339_MS_UTC.fullmatch(document["ts"]), document
    (connection,) = [d for d in documents if d.get("event") == "connection"]
    assert connection["logger"] == "hybridrelay.access" and connection["level"] == "info"
    assert connection["hc"] == "demo" and connection["kind"] == "websocket"
    # The relay counts the WebSocket frames it forwards, headers included (2 bytes for a short
    # frame; at most 14), so a message's payload is a lower bound and one header the slack.
    assert 2 <= connection["bytes_to_listener"] <= 2 + 14, connection
    assert 3 <= connection["bytes_to_sender"] <= 3 + 14, connection
    assert connection["tracking_id"] and connection["duration"] >= 0
    refusals = [d for d in documents if d.get("event") == "refused"]
    assert [(d["kind"], d["status"], d["hc"]) for d in refusals] == [("listen", 401, "demo")]
    # Never a key or a token: not the root key, not the signature the refused listener sent.
    key = cs.split("SharedAccessKey=", 1)[1].split(";", 1)[0]
    assert key not in text and "notasecretsig" not in text


@pytest.mark.timeout(10)
def test_text_format_is_loggings_own_with_the_time_made_once_a_second() -> None:
    ours, logging_own = TextFormatter(), logging.Formatter(LOG_FORMAT)
    # Within one second, across its end, back again (another thread's older record), and a
    # millisecond that rounds down.
    for created in (1e9 + 0.25, 1e9 + 0.9999, 1e9 + 1.0, 1e9 + 0.5, 1.7e9 + 0.0005, time.time()):
        record = logging.LogRecord(
            "hybridrelay.access", logging.INFO, "", 0, "http %s", ("x",), None
        )
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == logging_own.format(record)
    # With an exception and a stack after the line, and a worker's tag before the name.
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    failed = logging.LogRecord("hybridrelay.server", logging.ERROR, "", 0, "%d%%", (5,), exc_info)
    failed.stack_info = "Stack (most recent call last):\n  here"
    assert ours.format(failed) == logging.Formatter(LOG_FORMAT).format(failed)
    tagged = LOG_FORMAT.replace("%(name)s", "[worker 3] %(name)s")
    assert TextFormatter(worker=3).format(failed) == logging.Formatter(tagged).format(failed)


@pytest.mark.timeout(10)
def test_a_worker_s_lines_name_it() -> None:
    """``serve --workers N``: a worker's text lines carry ``[worker I]`` before the logger's
    name, its json lines a ``worker`` key; a process that is no worker writes neither."""
    record = logging.LogRecord("hybridrelay.server", logging.INFO, "", 0, "drain over", (), None)
    assert " INFO [worker 1] hybridrelay.server: drain over" in TextFormatter(worker=1).format(
        record
    )
    assert "[worker" not in TextFormatter().format(record)
    assert json.loads(JsonFormatter(worker=0).format(record))["worker"] == 0
    assert "worker" not in json.loads(JsonFormatter().format(record))


# -- the access log's lines without a record (BatchedStreamHandler.emit_fields) -------------

_FIELD_FORMATTERS: dict[str, Callable[[], TextFormatter | JsonFormatter]] = {
    "text": TextFormatter,
    "text-worker": lambda: TextFormatter(worker=2),
    "json": JsonFormatter,
    "json-worker": lambda: JsonFormatter(worker=2),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(_FIELD_FORMATTERS))
@given(
    created=st.floats(min_value=0, max_value=5e9) | st.sampled_from(_STAMP_EDGES),
    message=st.text(max_size=40),
    fields=st.dictionaries(
        st.sampled_from(["hc", "status", "ts", "message", "bytes", "sender"]),
        st.integers() | st.text(max_size=10) | st.none(),
        max_size=4,
    ),
)
def test_a_line_from_fields_is_the_record_s_line(
    kind: str, created: float, message: str, fields: dict[str, object]
) -> None:
    """What the access log writes without a record is the line logging writes of one: the
    same time, level, logger, message and fields (a field named like a key of the line does
    not replace it)."""
    formatter = _FIELD_FORMATTERS[kind]()
    made = logging.LogRecord("hybridrelay.access", logging.INFO, "", 0, message, (), None)
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    made.fields = fields
    assert formatter.format_fields(
        created, made.msecs, "INFO", "hybridrelay.access", message, fields
    ) == formatter.format(made)


@pytest.mark.timeout(30)
def test_the_access_log_writes_past_logging_only_to_a_lone_batched_handler() -> None:
    """With the process's batched handler alone on the way, the access line is written to
    it directly; with another handler (a test's, an application's), a filter, or a level
    above INFO on the handler, the line is a record that every handler gets, as before."""
    from hybridrelay.observability.access_log import AccessLog

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=3600)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    seen: list[logging.LogRecord] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    other = Recording()
    access = logging.getLogger("hybridrelay.access")
    try:
        log = AccessLog()
        fields = {"method": "GET", "status": 200, "duration": 0.0, "sender": "127.0.0.1"}
        kwargs = {**fields, "request_bytes": None, "response_bytes": 2}

        def lines() -> list[dict[str, object]]:
            handler.flush()
            text, _ = stream.getvalue(), stream.truncate(0)
            stream.seek(0)
            return [json.loads(line) for line in text.splitlines()]

        log.http_request("t1", "hc", **kwargs)  # type: ignore[arg-type]
        (direct,) = lines()
        assert direct["message"] == (
            "http tracking_id=t1 hc=hc method=GET status=200 duration=0.0 response_bytes=2 "
            "sender=127.0.0.1"
        )
        assert direct["event"] == "http" and direct["response_bytes"] == 2
        assert direct["logger"] == "hybridrelay.access" and direct["level"] == "info"

        access.addHandler(other)  # a second handler on the way: logging's path
        log.http_request("t2", "hc", **kwargs)  # type: ignore[arg-type]
        access.removeHandler(other)
        (through_logging,) = lines()
        assert [r.getMessage() for r in seen] == [through_logging["message"]]
        assert {k: v for k, v in through_logging.items() if k != "ts"} == {
            **{k: v for k, v in direct.items() if k != "ts"},
            "message": direct["message"].replace("t1", "t2"),
            "tracking_id": "t2",
        }

        dropped: list[logging.LogRecord] = []

        def drop(record: logging.LogRecord) -> bool:
            dropped.append(record)
            return False

        handler.addFilter(drop)  # the handler's filter sees (and here drops) the record
        log.http_request("t3", "hc", **kwargs)  # type: ignore[arg-type]
        handler.removeFilter(drop)
        assert [r.fields["tracking_id"] for r in dropped] == ["t3"]  # type: ignore[attr-defined]
        handler.setLevel(logging.WARNING)
        log.http_request("t4", "hc", **kwargs)  # type: ignore[arg-type]
        assert lines() == []
    finally:
        access.removeHandler(other)
        root.handlers[:], root.level = saved
        handler.close()
