"""Unprivileged accounts used by the dev cluster: two scientists and the service account."""

from __future__ import annotations

import pwd
import subprocess
from dataclasses import dataclass


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
