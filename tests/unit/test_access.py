"""Job directories are opened to the job's user with POSIX ACLs (agent/access.py:
grant_access), or the staging fails: the directory is private to the service account, so a job
started without the ACL could not read its inputs."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcstage.agent.access import grant_access
from hpcstage.errors import AccessError

ME = pwd.getpwuid(os.getuid()).pw_name
OTHER = "nobody" if ME != "nobody" else "root"


@pytest.fixture
def view(tmp_path: Path) -> Path:
    path = tmp_path / "jobs" / "42"
    path.mkdir(parents=True, mode=0o700)
    return path


def test_the_service_accounts_own_job_needs_no_acl(view: Path) -> None:
    assert grant_access(view, ME) is False
    assert grant_access(view, "") is False


@pytest.mark.skipif(shutil.which("getfacl") is None, reason="acl tools missing")
def test_the_jobs_user_gets_rwx_and_new_files_stay_readable_to_the_agent(view: Path) -> None:
    assert grant_access(view, OTHER) is True
    acl = subprocess.run(
        ["getfacl", "-p", str(view)], capture_output=True, text=True, check=True
    ).stdout
    assert f"user:{OTHER}:rwx" in acl
    assert f"default:user:{OTHER}:rwx" in acl and f"default:user:{ME}:rwx" in acl


def test_without_setfacl_the_staging_fails_with_what_to_install(
    view: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AccessError) as caught:
        grant_access(view, OTHER)
    text = str(caught.value)
    assert f"cannot give {OTHER} access to the job directory {view}" in text
    assert "setfacl" in text and "Debian package acl" in text


def test_a_refused_setfacl_fails_the_staging_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(AccessError, match="No such file or directory"):
        grant_access(tmp_path / "gone", OTHER)
