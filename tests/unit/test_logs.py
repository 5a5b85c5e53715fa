"""The log formats of the daemon and the agent (hpcstage/logs.py), on real file descriptors."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.logs import (
    JournalFormatter,
    JsonFormatter,
    journal_stream,
    resolve_format,
    setup_logging,
    stderr_is_journal,
    syslog_priority,
)


def _record(level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad value")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("hpcstage.daemon", level, __file__, 1, msg, args, exc_info)
    record.created = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z
    return record


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (25, 6),  # a custom level between INFO and WARNING
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.NOTSET, 7),
    ],
)
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_journal_lines_have_a_priority_and_no_time() -> None:
    fmt = JournalFormatter("%(name)s %(levelname)s %(message)s")
    assert fmt.format(_record(logging.WARNING, "node %s is slow", "n1")) == (
        "<4>hpcstage.daemon WARNING node n1 is slow"
    )


def test_journal_traceback_every_line_prefixed() -> None:
    lines = JournalFormatter("%(message)s").format(_record(logging.ERROR, "a\nb", exc=True))
    split = lines.split("\n")
    assert split[:2] == ["<3>a", "<3>b"]
    assert split[2] == "<3>Traceback (most recent call last):"
    assert split[-1] == "<3>ValueError: bad value"
    assert all(line.startswith("<3>") for line in split)


def test_json_one_object_per_line() -> None:
    text = JsonFormatter({"node": "n1"}).format(_record(logging.INFO, "got %d\nfiles", 3))
    assert "\n" not in text
    assert json.loads(text) == {
        "ts": "2023-11-14T22:13:20.250Z",
        "level": "INFO",
        "logger": "hpcstage.daemon",
        "message": "got 3\nfiles",
        "node": "n1",
    }


def test_json_carries_the_exception() -> None:
    entry = json.loads(JsonFormatter().format(_record(logging.ERROR, "failed", exc=True)))
    assert entry["message"] == "failed"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].endswith("ValueError: bad value")


def test_json_control_and_non_ascii_characters_stay_on_one_line() -> None:
    text = JsonFormatter().format(_record(logging.INFO, "k\u2028\x1b[31m\udcff"))
    assert text.isascii() and "\n" not in text
    assert json.loads(text)["message"] == "k\u2028\x1b[31m\udcff"


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "stderr", os.O_WRONLY | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


def _journal_value(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_matches_only_the_same_file(stderr_file: int, tmp_path: Path) -> None:
    value = _journal_value(stderr_file)
    assert stderr_is_journal({"JOURNAL_STREAM": value}, stderr_file)
    assert not stderr_is_journal({}, stderr_file)
    # A child whose stderr was redirected (a pipe, another file) inherits the variable.
    r, w = os.pipe()
    try:
        assert not stderr_is_journal({"JOURNAL_STREAM": value}, w)
    finally:
        os.close(r)
        os.close(w)
    other = tmp_path / "other"
    other.write_text("")
    assert not journal_stream(value, other.stat())


@pytest.mark.parametrize("value", ["", "12", "12:", ":34", "a:b", "1:2:3", "-1:5", " 1:2"])
def test_journal_stream_malformed(value: str, stderr_file: int) -> None:
    assert not journal_stream(value, os.fstat(stderr_file))


def test_closed_stderr_is_not_the_journal(stderr_file: int) -> None:
    r, w = os.pipe()
    value = _journal_value(w)
    os.close(r)
    os.close(w)
    assert not stderr_is_journal({"JOURNAL_STREAM": value}, w)
    assert not stderr_is_journal({"JOURNAL_STREAM": value}, -1)


def test_auto_resolves_by_stderr(stderr_file: int) -> None:
    env = {"JOURNAL_STREAM": _journal_value(stderr_file)}
    assert resolve_format("auto", env, stderr_file) == "journal"
    assert resolve_format("auto", {}, stderr_file) == "text"
    assert resolve_format("json", env, stderr_file) == "json"
    assert resolve_format("text", env, stderr_file) == "text"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, root.handlers[:], logging.getLogger("asyncssh").level)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    logging.getLogger("asyncssh").setLevel(saved[2])


@pytest.mark.usefixtures("restore_logging")
def test_setup_json_and_quiet_asyncssh() -> None:
    out = io.StringIO()  # no file descriptor: auto would mean text
    assert setup_logging("INFO", "json", text="", journal="", stream=out) == "json"
    logging.getLogger("asyncssh").info("[conn=1] Connected to SSH server at n1")
    logging.getLogger("asyncssh").warning("[conn=1] Connection lost")
    logging.getLogger("hpcstage.daemon").info("tick")
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["logger"], e["message"]) for e in entries] == [
        ("asyncssh", "[conn=1] Connection lost"),
        ("hpcstage.daemon", "tick"),
    ]


@pytest.mark.usefixtures("restore_logging")
def test_setup_debug_keeps_asyncssh_info() -> None:
    out = io.StringIO()
    assert setup_logging("DEBUG", "auto", text="%(name)s %(message)s", journal="", stream=out) == (
        "text"
    )
    logging.getLogger("asyncssh").info("[conn=1] Connected")
    assert out.getvalue() == "asyncssh [conn=1] Connected\n"
