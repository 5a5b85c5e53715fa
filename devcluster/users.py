"""Unprivileged accounts used by the dev cluster: two scientists and the service account."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DevUser:
    name: str
    account: str  # Slurm account the user submits under
    comment: str


SCIENTISTS = (
    DevUser("alice", "chem", "hpcstage dev scientist (docking)"),
    DevUser("bob", "bio", "hpcstage dev scientist (genomics)"),
)
SERVICE = DevUser("hpcstage", "", "hpcstage service account (daemon and agents)")
ALL_USERS = (*SCIENTISTS, SERVICE)


def ensure_user(user: DevUser) -> pwd.struct_passwd:
    """Create ``user`` with a home directory and bash login shell unless it exists."""
    try:
        pwd.getpwnam(user.name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--create-home",
                "--shell",
                "/bin/bash",
                "--comment",
                user.comment,
                user.name,
            ],
            check=True,
        )
        # useradd leaves the password "!" (locked); sshd without PAM then refuses even key
        # logins. "*" means: no password can match, but the account is not locked.
        subprocess.run(["usermod", "--password", "*", user.name], check=True)
    return pwd.getpwnam(user.name)


def ensure_all() -> None:
    """Create every dev-cluster account that is missing."""
    for user in ALL_USERS:
        ensure_user(user)


def unreachable_dirs(paths: Iterable[Path]) -> list[Path]:
    """Directories on the way to ``paths`` (themselves included) that other users cannot
    traverse: a checkout under /root (mode 0700 on Debian) is one."""
    found: list[Path] = []
    for path in paths:
        path = path.resolve()
        for directory in (*reversed(path.parents), path):
            try:
                mode = os.stat(directory).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH and directory not in found:
                found.append(directory)
    return found


def grant_traverse(paths: Iterable[Path], accounts: Iterable[DevUser] = ALL_USERS) -> list[Path]:
    """Let the dev accounts reach ``paths`` (the venv and the source tree they run hpcstage
    from): each directory on the way that others cannot traverse gets an ACL entry giving
    each account search permission (x) only, no listing or reading. Returns those
    directories; ``setfacl -x u:NAME DIR`` takes an entry back."""
    directories = unreachable_dirs(paths)
    if directories:
        entries = ",".join(f"u:{user.name}:x" for user in accounts)
        subprocess.run(["setfacl", "-m", entries, *map(str, directories)], check=True)
    return directories
