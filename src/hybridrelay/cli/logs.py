"""The log output of our processes: one line per record on stderr, written in batches.

The bridges log one INFO line per relayed connection (operators audit them). Written one by
one, each line is a system call and a wake-up of whatever reads stderr (journald, a pipe), on
the machine that does the relaying: measured here, batching them gave 8-12 % more new tunnels
per second on both paths (docs/PERFORMANCE.md), and so did dropping the line altogether. Here
lines are gathered and written together at most ``FLUSH_INTERVAL`` later, by a thread of the
handler's own; a WARNING or worse, a full batch, and the process' exit (``logging.shutdown``)
write at once. What a process killed with SIGKILL had not written yet is lost, as with any
buffered log.

Each line is ``LOG_FORMAT`` text, or with ``--log-format json`` one JSON object
(:class:`JsonFormatter`) for log shippers. The formats, the relay's access and refusal lines
(``observability/access_log.py``) and the rule that no key or token is ever written:
docs/LOGGING.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, TextIO, cast

from hybridrelay.settings import LOG_LEVEL, LOG_LEVELS, add_setting_argument

__all__ = [
    "FLUSH_INTERVAL",
    "LOG_FORMAT",
    "LOG_FORMATS",
    "LOG_FORMAT_ENV",
    "BatchedStreamHandler",
    "JsonFormatter",
    "add_log_format_argument",
    "add_log_level_argument",
    "configure_logging",
    "install_batched_stderr",
    "name_worker",
    "say",
]

#: The longest a line waits before it is written.
FLUSH_INTERVAL = 0.1
#: A batch is written as soon as it holds this many characters.
BATCH_LIMIT = 64 * 1024
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A :class:`logging.StreamHandler` that writes its lines in batches (see the module)."""

    def __init__(self, stream: TextIO, *, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(stream)
        self._interval = interval
        self._batch: list[str] = []
        self._size = 0
        self._stop = threading.Event()
        self._writer = threading.Thread(
            target=self._write_periodically, name="hybridrelay-log-writer", daemon=True
        )
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._append(line, record.levelno)

    def emit_fields(self, levelno: int, logger: str, message: str, fields: dict[str, Any]) -> bool:
        """Write the line a record of ``logger`` at ``levelno`` with ``message`` and the
        ``fields`` extra would make, made now, without the record (the relay's access log
        writes one per relayed request: building and handing on the record was most of its
        cost, D27). False when this handler cannot (a formatter of someone else's, a filter,
        a level above ``levelno``): then log it the usual way."""
        formatter = self.formatter
        if (
            self.filters
            or levelno < self.level
            or type(formatter) not in (TextFormatter, JsonFormatter)
        ):
            return False
        created = time.time()
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord makes them
        line = cast(TextFormatter | JsonFormatter, formatter).format_fields(
            created, msecs, logging.getLevelName(levelno), logger, message, fields
        )
        self._append(line, levelno)
        return True

    def _append(self, line: str, levelno: int) -> None:
        line += self.terminator
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ made it
            self._batch.append(line)
            self._size += len(line)
            full = self._size >= BATCH_LIMIT
        if full or levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self._batch:
                return
            text = "".join(self._batch)
            self._batch.clear()
            self._size = 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing to report it on
                pass

    def close(self) -> None:
        # No join: logging.shutdown() calls this holding the handler's lock, which the writer
        # may be waiting for; it finds nothing left to write and ends at its next wake-up.
        self._stop.set()
        self.flush()
        super().close()

    def _write_periodically(self) -> None:
        while not self._stop.wait(self._interval):
            if self._batch:  # read without the lock: a line missed now goes out next time
                self.flush()


class TextFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, with the date and time text made once per second, not per record
    (``time.strftime`` showed in the relay's profile: its access log writes a line per
    relayed request). The same text as :class:`logging.Formatter`'s."""

    def __init__(self, *, worker: int | None = None) -> None:
        # A worker of ``serve --workers N`` names itself after the level: the workers share
        # the supervisor's stderr.
        tag = "" if worker is None else f"[worker {worker}] "
        self._tag = tag
        super().__init__(LOG_FORMAT.replace("%(name)s", tag + "%(name)s"))
        #: (second, its text): one tuple, so that threads never pair one with another's.
        self._stamp = (-1, "")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # LOG_FORMAT written directly: the %-style's substitution reads record.__dict__ by
        # name for each field, a cost per line of the access log (D24). Same text.
        return f"{record.asctime} {record.levelname} {self._tag}{record.name}: {record.message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time_text(record.created, record.msecs)

    def _time_text(self, created: float, msecs: float) -> str:
        second = int(created)
        stamp = self._stamp
        if stamp[0] != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            stamp = self._stamp = (second, text)
        return f"{stamp[1]},{int(msecs):03d}"  # logging's default_msec_format

    def format_fields(
        self,
        created: float,
        msecs: float,
        levelname: str,
        logger: str,
        message: str,
        _: dict[str, Any],
    ) -> str:
        """The text :meth:`format` makes of a record with these (no exception, no stack)."""
        return f"{self._time_text(created, msecs)} {levelname} {self._tag}{logger}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``--log-format json``, docs/LOGGING.md): ``ts`` (RFC 3339,
    UTC, milliseconds), ``level``, ``logger``, ``message``, the record's structured ``fields``
    (the access and refusal logs') as keys of their own, and ``exc`` for an exception."""

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        #: ``worker``: the index of a worker of ``serve --workers N``, on every record.
        self._worker = worker
        #: (second, its text to the seconds): one tuple, so threads never pair two seconds'.
        self._stamp = (0, _utc_seconds_text(0))

    def _timestamp(self, created: float) -> str:
        """``created`` as RFC 3339 text in UTC to the millisecond, the same text as
        ``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")`` with ``Z``
        for ``+00:00`` (which showed in the profile, once per line): the text to the second
        is made once per second. ``fromtimestamp``'s own rounding: the fraction to the nearest
        microsecond (half to even, carried into the second), then cut to milliseconds."""
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            micros -= 1_000_000
            whole += 1
        elif micros < 0:
            micros += 1_000_000
            whole -= 1
        second = int(whole)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, _utc_seconds_text(second))
        return f"{stamp[1]}.{micros // 1000:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        document = self._document(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
        )
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        # ASCII-only: json escapes "\n" but would leave U+2028, U+0085 and the like raw, and a
        # reader that splits on those (str.splitlines does) would cut the object in two.
        # default=str: a field's value we did not foresee is written, not the record lost.
        return _JSON_LINE.encode(document)

    def format_fields(
        self,
        created: float,
        _msecs: float,
        levelname: str,
        logger: str,
        message: str,
        fields: dict[str, Any],
    ) -> str:
        """The line :meth:`format` makes of a record with these (no exception, no stack)."""
        return _JSON_LINE.encode(self._document(created, levelname, logger, message, fields))

    def _document(
        self,
        created: float,
        levelname: str,
        logger: str,
        message: str,
        fields: dict[str, Any] | None,
    ) -> dict[str, Any]:
        document: dict[str, Any] = {
            "ts": self._timestamp(created),
            "level": levelname.lower(),
            "logger": logger,
            "message": message,
        }
        if self._worker is not None:
            document["worker"] = self._worker
        if fields:
            document.update({k: v for k, v in fields.items() if k not in document})
        return document


#: What ``json.dumps(document, default=str)`` would use, made once: with an argument,
#: ``json.dumps`` makes an encoder per call.
_JSON_LINE = json.JSONEncoder(default=str)


def _utc_seconds_text(second: int) -> str:
    """``second`` (since the epoch) as RFC 3339 date and time in UTC, to the second."""
    moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


#: ``--log-format``: how each record is written.
LOG_FORMATS = ("text", "json")
#: The environment variable ``--log-format`` defaults to.
LOG_FORMAT_ENV = "HYBRIDRELAY_LOG_FORMAT"


def install_batched_stderr(log_format: str = "text") -> None:
    """Give the root logger a :class:`BatchedStreamHandler` on stderr, unless it has a
    handler already (then the process' own logging setup stays). Levels are the commands'."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (one of {', '.join(LOG_FORMATS)})")
    root = logging.getLogger()
    if not root.handlers:
        handler = BatchedStreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        root.addHandler(handler)
        # Neither format writes the caller, thread or process of a record: logging need not
        # look them up for each one (the relay's access log writes one per relayed request;
        # the caller lookup showed in its profile). The logging docs' own "Optimization".
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log format (one of {', '.join(LOG_FORMATS)}; "
            f"${LOG_FORMAT_ENV} is the default)"
        )
    return text


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` of ``serve``, ``bridge`` and ``serve-app``."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        # argparse checks choices on the command line only; the type also runs on a string
        # default, so a wrong $HYBRIDRELAY_LOG_FORMAT is a usage error, not silently text.
        type=_log_format,
        default=os.environ.get(LOG_FORMAT_ENV) or "text",
        help="human-readable lines, or one JSON object per line (default: "
        "$HYBRIDRELAY_LOG_FORMAT, else text; docs/LOGGING.md)",
    )


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` option of ``serve`` and ``serve-app`` (the bridge's comes from its
    model, the same :data:`~hybridrelay.settings.LOG_LEVEL`)."""
    add_setting_argument(parser, LOG_LEVEL, str, "log_level", default="info", default_text="info")


def configure_logging(level_name: str, *, logger: str = "") -> None:
    """Log to stderr in batches (unless the process has its own handler) at ``level_name``,
    set on ``logger`` (the root logger by default; the bridge sets ``hybridrelay`` only, so
    the libraries under it keep their warnings-only default)."""
    install_batched_stderr()
    logging.getLogger(logger or None).setLevel(LOG_LEVELS[level_name])


def name_worker(index: int) -> None:
    """Make this process's log lines name it as worker ``index`` of ``serve --workers N``
    (text: ``[worker I]`` before the logger's name; json: a ``worker`` key)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BatchedStreamHandler):
            json_lines = isinstance(handler.formatter, JsonFormatter)
            handler.setFormatter(
                JsonFormatter(worker=index) if json_lines else TextFormatter(worker=index)
            )


def say(line: str) -> None:
    """Write one line of the program's own output (readiness, the endpoints) to stdout in one
    write, and flush it. ``print`` writes the text and its newline separately when Python runs
    unbuffered (``PYTHONUNBUFFERED``), and a log line on stderr sharing the pipe can land in
    between, cutting the line a supervisor waits for."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
