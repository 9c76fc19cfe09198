"""Connection strings kept out of ``ps``: ``--connection-string-file PATH`` on every command that
takes ``-x``, and one warning when a key is given on the command line anyway.

A command line is readable by every user of the machine (``ps``, ``/proc/PID/cmdline``) and
stays in shell history; a file with mode 0600 or ``$HYBRIDRELAY_CONNECTION_STRING`` (whose
``/proc/PID/environ`` only the same user and root can read) are not.
"""

from __future__ import annotations

import argparse
import os
import stat

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.connection_string import CONNECTION_STRING_ENV

__all__ = [
    "FILE_OPTION",
    "add_connection_string_file_argument",
    "given_connection_string",
    "key_on_command_line_warning",
    "read_connection_string_file",
]

FILE_OPTION = "--connection-string-file"
#: The most a connection string file may hold (one is a few hundred bytes).
MAX_FILE_SIZE = 64 * 1024


def add_connection_string_file_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
) -> None:
    parser.add_argument(
        FILE_OPTION,
        dest="connection_string_file",
        metavar="PATH",
        default=None,
        help="read the connection string from this file (mode 0600) instead of -x, which other "
        f"users can see in ps; ${CONNECTION_STRING_ENV} works too",
    )


def read_connection_string_file(path: str) -> tuple[str, str | None]:
    """``(connection string, warning or None)`` from ``path``: its text without surrounding
    whitespace; the warning when group or others may read the file.

    Raises:
        ConfigurationError: the file cannot be read, is too large or is empty.
    """
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigurationError(f"{FILE_OPTION} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigurationError(f"{FILE_OPTION} {path}: larger than {MAX_FILE_SIZE} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{FILE_OPTION} {path}: not UTF-8 text") from None
    if not text:
        raise ConfigurationError(f"{FILE_OPTION} {path}: the file is empty")
    warning = None
    if stat.S_IMODE(mode) & (stat.S_IRWXG | stat.S_IRWXO):
        warning = (
            f"{FILE_OPTION} {path}: group or others may read it (mode "
            f"{stat.S_IMODE(mode):04o}): chmod 600 {path}"
        )
    return text, warning


def key_on_command_line_warning(connection_string: str | None) -> str | None:
    """The warning for a connection string given with ``-x`` when it holds a key, or None.

    Only the presence of the key is looked at (no parsing: a malformed string is reported
    where it is parsed), and the key never goes into the warning.
    """
    if not connection_string or "sharedaccesskey=" not in connection_string.lower():
        return None
    return (
        "a SharedAccessKey on the command line can be read by every user of this machine (ps, "
        f"/proc) and stays in shell history: set ${CONNECTION_STRING_ENV} or use "
        f"{FILE_OPTION} PATH instead"
    )


def given_connection_string(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(connection string or None, warning or None)`` of ``-x`` or of :data:`FILE_OPTION`:
    the warning is :func:`key_on_command_line_warning`'s, or the file's.

    Raises:
        ConfigurationError: both are given, or the file cannot be read.
    """
    text: str | None = getattr(args, "connection_string", None)
    path = getattr(args, "connection_string_file", None)
    if path is None:
        return text, key_on_command_line_warning(text)
    if text is not None:
        raise ConfigurationError(f"give -x or {FILE_OPTION}, not both")
    return read_connection_string_file(path)
