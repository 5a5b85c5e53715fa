"""How the daemon reads an SSH agent's stderr lines (staging/pool.py: agent_line): the
agent's text form and its JSON form at their own level, anything else as a warning."""

from __future__ import annotations

import json
import logging

import pytest

from hpcstage.logs import JsonFormatter
from hpcstage.staging.pool import agent_line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agent[n1] INFO cache reconciled", (logging.INFO, "cache reconciled")),
        ("agent[n1] ERROR disk full", (logging.ERROR, "disk full")),
        (
            "bash: hpcstage: command not found",
            (logging.WARNING, "bash: hpcstage: command not found"),
        ),
        ('{"level": "DEBUG", "message": "m"}', (logging.DEBUG, "m")),
        ('{"level": "ERROR", "message": "m", "exc": "Traceback"}', (logging.ERROR, "m\nTraceback")),
        (
            '{"level": "LOUD", "message": "m"}',
            (logging.WARNING, '{"level": "LOUD", "message": "m"}'),
        ),
        ('{"level": "INFO", "message": 3}', (logging.WARNING, '{"level": "INFO", "message": 3}')),
        ('{"level": "INFO", "mess', (logging.WARNING, '{"level": "INFO", "mess')),
        ('["INFO", "m"]', (logging.WARNING, '["INFO", "m"]')),
    ],
)
def test_agent_line(text: str, expected: tuple[int, str]) -> None:
    assert agent_line(text) == expected


def test_what_the_agent_writes_in_json_is_read_back() -> None:
    record = logging.LogRecord("hpcstage.agent", logging.WARNING, "f", 1, "slow %s", ("n1",), None)
    line = JsonFormatter({"node": "n1"}).format(record)
    assert json.loads(line)["node"] == "n1"
    assert agent_line(line) == (logging.WARNING, "slow n1")
