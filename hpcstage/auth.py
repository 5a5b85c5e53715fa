"""Who is calling the API: MUNGE credentials, as Slurm authenticates its own clients.

The CLI makes one credential per request (``munge -n``) and sends it as
``Authorization: MUNGE <credential>``. The daemon decodes it with ``unmunge``: munged checks
the signature, the time to live and replays, and reports the caller's uid and gid. No
password or token is stored anywhere.
"""

from __future__ import annotations

import pwd
import subprocess
from dataclasses import dataclass

from hpcstage.errors import HpcstageError

SCHEME = "MUNGE"
# unmunge's exit codes for the refusals users meet (munge_err_t in munge.h).
_MUNGE_ERRORS = {
    15: "expired credential",
    16: "rewound credential (clock skew)",
    17: "replayed credential",
    18: "unauthorized credential",
}


class AuthError(HpcstageError):
    """The credential is missing, invalid, expired or replayed."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    user: str
    uid: int
    admin: bool


def encode(socket: str | None = None) -> str:
    """A fresh MUNGE credential for the calling user (no payload)."""
    argv = ["munge", "--no-input", *(["--socket", socket] if socket else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthError(f"cannot create a MUNGE credential (is munge installed?): {exc}") from exc
    if done.returncode != 0:
        raise AuthError(f"cannot create a MUNGE credential: {done.stderr.strip()}")
    return done.stdout.strip()


async def decode(credential: str, socket: str | None = None) -> tuple[int, int]:
    """(uid, gid) of a credential; AuthError with munged's reason when it is not valid."""
    import asyncio  # here: the CLI only encodes, and asyncio costs it ~25 ms to import

    try:
        process = await asyncio.create_subprocess_exec(
            "unmunge",
            "--keys=UID,GID",
            "--numeric",
            *(["--socket", socket] if socket else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(credential.encode()), 30)
    except (OSError, TimeoutError) as exc:
        raise AuthError(f"cannot check the MUNGE credential: {exc}") from exc
    if process.returncode != 0:
        reason = err.decode(errors="replace").strip().removeprefix("unmunge: Error: ")
        reason = _MUNGE_ERRORS.get(process.returncode or 0, reason or "invalid")
        raise AuthError(f"MUNGE credential refused: {reason}")
    return _ids(out.decode())


def _ids(text: str) -> tuple[int, int]:
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            found[key.strip()] = int(value.strip())
    if "UID" not in found or "GID" not in found:
        raise AuthError("MUNGE credential carries no uid/gid")
    return found["UID"], found["GID"]


def user_name(uid: int) -> str:
    """The login name of ``uid`` (the numeric id if it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def header(socket: str | None = None) -> str:
    """The Authorization header value for one request."""
    return f"{SCHEME} {encode(socket)}"
