"""The audit log's format and MUNGE output parsing (pure parts of auth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcstage.audit import AuditLog
from hpcstage.auth import AuthError, _ids


def test_audit_lines_are_json_objects_appended(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("stage-in", job=7, user="alice", src="s3://d/x/")
    log.record("refused", job=8, user="bob", reason="no rule")
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["stage-in", "refused"]
    assert lines[1]["reason"] == "no rule"
    assert all(isinstance(x["ts"], float) for x in lines)
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_audit_failure_is_logged_not_raised(tmp_path: Path) -> None:
    AuditLog(tmp_path / "missing-dir" / "audit.jsonl").record("x")  # must not raise


def test_unmunge_metadata_is_parsed() -> None:
    assert _ids("UID:             1001\nGID:             1002\n\n") == (1001, 1002)


def test_unmunge_without_ids_is_refused() -> None:
    with pytest.raises(AuthError, match="no uid/gid"):
        _ids("STATUS: Success (0)\n")
