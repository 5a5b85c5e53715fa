"""A job's directory opened to its user (POSIX ACLs, set by the service account: no root)
when it is staged, and closed again before its outputs are read for stage-out."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from hpcstage.errors import AccessError

log = logging.getLogger("hpcstage.agent")


def grant_access(view: Path, user: str) -> bool:
    """Let the job's user read the view and create outputs in it; keep the agent able to read.

    POSIX ACLs set by the owner (the service account): no root needed. The default entries
    make what the job creates readable to the agent for stage-out. True when an entry was
    added, False when none is needed (the job runs as the service account). AccessError when
    it cannot be done: the view is private to the service account, so a job started anyway
    could not read its inputs.
    """
    if not user or user == _self_user():
        return False
    spec = f"u:{user}:rwx,d:u:{user}:rwx,d:u:{_self_user()}:rwx"
    try:
        done = subprocess.run(
            ["setfacl", "-m", spec, str(view)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        problem = done.stderr.strip() or f"setfacl exited {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        done, problem = None, str(exc)
    if done is None or done.returncode != 0:
        raise AccessError(
            f"cannot give {user} access to the job directory {view}: {problem}; the node"
            " cache needs POSIX ACLs (setfacl, Debian package acl, on a file system with ACL"
            " support)"
        )
    return True


def revoke_access(view: Path, user: str) -> None:
    """Remove the job user's ACL entries from the view (idempotent; best effort)."""
    if not user or user == _self_user() or not view.exists():
        return
    done = subprocess.run(
        ["setfacl", "-x", f"u:{user},d:u:{user}", str(view)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0 and "No such" not in done.stderr:
        log.warning("cannot revoke ACLs on %s: %s", view, done.stderr.strip())


def _self_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def grant_read(tree: Path, user: str) -> None:
    """Let ``user`` read a packed tree (one ACL entry on its top directory; no root needed).
    AccessError when it cannot be done (the job could not read its input)."""
    if not user or user == _self_user():
        return
    done = _setfacl("-m", f"u:{user}:r-x", tree)
    if done:
        raise AccessError(f"cannot give {user} read access to the packed tree {tree}: {done}")


def revoke_read(tree: Path, user: str) -> None:
    """Remove ``user``'s entry from a packed tree (best effort: logged)."""
    if not user or user == _self_user() or not tree.exists():
        return
    problem = _setfacl("-x", f"u:{user}", tree)
    if problem:
        log.warning("cannot revoke ACLs on %s: %s", tree, problem)


def _setfacl(action: str, spec: str, path: Path) -> str:
    """Run setfacl; "" on success, else what went wrong."""
    try:
        done = subprocess.run(
            ["setfacl", action, spec, str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return ""
    return done.stderr.strip() or f"setfacl exited {done.returncode}"
