"""The audit log's format and what a decoded MUNGE credential means (pure parts of auth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcstage.auth import _verdict, decode_now
from hpcstage.errors import AuthError
from hpcstage.service.audit import AuditLog


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


def test_a_valid_credential_without_payload_gives_its_ids() -> None:
    assert _verdict(0, "", 0, 1001, 1002) == (1001, 1002)


def test_a_credential_with_a_payload_is_refused_whatever_it_says() -> None:
    # The attack of issue 15: the payload 'UID:0\nGID:0\n' (12 bytes) must not count.
    with pytest.raises(AuthError, match="carries a payload"):
        _verdict(0, "", 12, 1001, 1002)


def test_munge_errors_name_the_reason() -> None:
    with pytest.raises(AuthError, match="replayed credential"):
        _verdict(17, "Replayed credential", 0, 0, 0)
    with pytest.raises(AuthError, match="Invalid credential format"):
        _verdict(8, "Invalid credential format", 0, 0, 0)


def test_malformed_credentials_are_refused_before_munged_is_asked() -> None:
    for bad in ("MUNGE:a\0b:", "x" * 5000):
        with pytest.raises(AuthError, match="malformed"):
            decode_now(bad, socket="/nonexistent/munge.socket")
