"""The real daemon's log on stderr: in the journal's form when stderr is the stream systemd
named in JOURNAL_STREAM, and JSON lines with --log-format json. No Slurm or S3 is needed: the
daemon logs that it holds the state's lock before it asks either."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HPCSTAGE = Path(sys.executable).parent / "hpcstage"
ACTIVE = "active: this daemon holds"
WAIT = 60.0


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[site]\nname = "t"\nstate_dir = "{tmp_path / "state"}"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
    )
    return path


def _run_until(log: Path, args: list[str], env: dict[str, str]) -> Iterator[str]:
    """Start the daemon with stderr appended to ``log``, wait for its first line saying it is
    active, stop it (SIGTERM) and yield the lines it wrote."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [str(HPCSTAGE), "daemon", "--no-api", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", **env},
        )
    try:
        deadline = time.monotonic() + WAIT
        while ACTIVE not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, f"no {ACTIVE!r} in {WAIT} s:\n{log.read_text()}"
            time.sleep(0.1)
        assert proc.poll() is None, f"the daemon exited:\n{log.read_text()}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
    yield from log.read_text().splitlines()


def test_journal_form_under_journal_stream(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    log.touch()
    st = log.stat()
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    lines = list(_run_until(log, ["--config", str(_config(tmp_path))], env))
    assert any(re.fullmatch(r"<6>hpcstage\.daemon INFO active: .*", line) for line in lines)
    assert all(re.match(r"<[2-7]>[a-z]", line) for line in lines), lines


def test_text_when_stderr_is_not_that_stream(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    env = {"JOURNAL_STREAM": f"{os.stat('/').st_dev}:1"}  # inherited, stderr redirected
    lines = list(_run_until(log, ["--config", str(_config(tmp_path))], env))
    stamped = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} hpcstage\.daemon INFO active: .*"
    assert any(re.fullmatch(stamped, line) for line in lines), lines


def test_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "stderr"
    args = ["--config", str(_config(tmp_path)), "--log-format", "json"]
    entries = [json.loads(line) for line in _run_until(log, args, {})]
    active = [e for e in entries if e["message"].startswith(ACTIVE)]
    assert len(active) == 1
    assert active[0]["logger"] == "hpcstage.daemon" and active[0]["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", active[0]["ts"])
