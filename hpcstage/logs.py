"""The log of the long-running processes (daemon, agent), shaped for where stderr goes.

- ``journal``: stderr is systemd's journal stream. journald stamps every line itself, so no
  timestamp of our own, and each line starts with its syslog priority (``<3>`` error, ``<4>``
  warning, ``<6>`` info, ``<7>`` debug: sd-daemon(3)) so that ``journalctl -p warning`` works.
  A traceback's lines each carry the priority: journald stores every line as its own entry.
- ``json``: one JSON object per line (ts, level, logger, message, exc) for log shippers.
- ``text``: a plain line for a terminal or a file.
- ``auto``: ``journal`` when systemd connected stderr to the journal, else ``text``.

Standard library only: the daemon's CLI and the agent both use it, on either side of the
import layers.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Literal, TextIO

LogFormat = Literal["auto", "text", "json", "journal"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "json", "journal")
ENV_VAR = "HPCSTAGE_LOG_FORMAT"  # how the daemon hands its format to the agents it starts

# sd-daemon(3)'s prefixes, from syslog(3): the highest level at or below a record's level wins.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7

# Libraries whose INFO lines are per connection and drown the daemon's own (asyncssh logs
# every SSH connection and channel it opens).
_CHATTY = ("asyncssh",)


def journal_stream(value: str | None, stat: os.stat_result) -> bool:
    """Whether ``stat`` (of stderr) is the stream systemd named in ``JOURNAL_STREAM``
    ("DEVICE:INODE", decimal). systemd.exec(5): a process should compare both, because a
    child whose stderr was redirected elsewhere still inherits the variable."""
    if not value:
        return False
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)


def stderr_is_journal(environ: Mapping[str, str], fd: int = 2) -> bool:
    """``journal_stream`` for file descriptor ``fd`` (stderr) of this process."""
    try:
        stat = os.fstat(fd)
    except OSError:  # stderr closed, or not a file (fd -1)
        return False
    return journal_stream(environ.get("JOURNAL_STREAM"), stat)


def resolve_format(wanted: LogFormat, environ: Mapping[str, str], fd: int = 2) -> LogFormat:
    """``wanted``, with ``auto`` turned into ``journal`` or ``text``."""
    if wanted != "auto":
        return wanted
    return "journal" if stderr_is_journal(environ, fd) else "text"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels: the next standard one below)."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """``fmt`` without a time, every line prefixed with ``<N>``, its record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; ``fields`` are added to each (e.g. the node)."""

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: a message with a stray control or invalid character stays one line.
        return json.dumps(entry, ensure_ascii=True)


def make_formatter(
    resolved: LogFormat, text: str, journal: str, fields: Mapping[str, str] | None = None
) -> logging.Formatter:
    """The formatter for a resolved format; ``text`` and ``journal`` are %-style formats."""
    if resolved == "json":
        return JsonFormatter(fields)
    if resolved == "journal":
        return JournalFormatter(journal)
    return logging.Formatter(text)


def setup_logging(
    level: str | int,
    wanted: LogFormat,
    *,
    text: str,
    journal: str,
    fields: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> LogFormat:
    """Log to ``stream`` (stderr) at ``level`` in the format ``wanted``; return the format
    chosen (``auto`` resolved). Chatty libraries log warnings and above unless at debug."""
    stream = stream or sys.stderr
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (io.UnsupportedOperation is a ValueError)
        fd = -1
    resolved = resolve_format(wanted, os.environ, fd)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter(resolved, text, journal, fields))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet = logging.DEBUG if logging.getLogger().level <= logging.DEBUG else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)
    return resolved
