"""Who is calling the API: MUNGE credentials, as Slurm authenticates its own clients.

The CLI makes one credential per request (``munge -n``, no payload) and sends it as
``Authorization: MUNGE <credential>``. The daemon decodes it with libmunge: munged checks
the signature, the time to live and replays, and reports the caller's uid and gid. A
credential with a payload is refused. No password or token is stored anywhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import pwd
import subprocess
from dataclasses import dataclass

from hpcstage.errors import AuthError

SCHEME = "MUNGE"
# An admin's request on behalf of this uid (burst_buffer.lua's `scontrol show bbstat`).
FOR_UID_HEADER = "X-Hpcstage-For-Uid"
# munge_decode's errors that users meet (munge_err_t in munge.h).
_MUNGE_ERRORS = {
    15: "expired credential",
    16: "rewound credential (clock skew)",
    17: "replayed credential",
    18: "unauthorized credential",
}


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
    # Imported here: the CLI only encodes, and need not pay for importing asyncio at start-up
    # (command start-up times: docs/benchmarks.md).
    import asyncio

    return await asyncio.to_thread(decode_now, credential, socket)


def decode_now(credential: str, socket: str | None = None) -> tuple[int, int]:
    """``decode`` for a thread: libmunge's munge_decode, which asks munged over its socket.

    Only the credential's metadata is trusted. Its payload is the caller's own text, and
    parsing ``unmunge``'s output mixed the two: a payload of ``UID:0`` lines made anyone
    root. The API's credentials carry no payload, so one that does is refused outright.
    """
    if "\0" in credential or len(credential) > _MAX_CREDENTIAL:
        raise AuthError("MUNGE credential refused: malformed")
    lib = _libmunge()
    ctx = lib.munge_ctx_create()
    if not ctx:
        raise AuthError("cannot check the MUNGE credential: out of memory")
    payload, length = ctypes.c_void_p(), ctypes.c_int(0)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    try:
        if socket and _set_socket(lib, ctx, socket) != 0:
            raise AuthError(f"cannot use the MUNGE socket {socket}")
        err = lib.munge_decode(
            credential.encode(),
            ctx,
            ctypes.byref(payload),
            ctypes.byref(length),
            ctypes.byref(uid),
            ctypes.byref(gid),
        )
        detail = (lib.munge_ctx_strerror(ctx) or b"").decode(errors="replace")
    finally:
        if payload.value:
            _libc_free(payload)
        lib.munge_ctx_destroy(ctx)
    return _verdict(err, detail, length.value, uid.value, gid.value)


def _verdict(err: int, detail: str, payload_length: int, uid: int, gid: int) -> tuple[int, int]:
    """Pure: what munge_decode's results mean for the API."""
    if err != 0:
        raise AuthError(f"MUNGE credential refused: {_MUNGE_ERRORS.get(err, detail or 'invalid')}")
    if payload_length:
        raise AuthError("MUNGE credential refused: it carries a payload (the API takes none)")
    return uid, gid


# Longer than any payload-less credential munged makes (~120 characters); refused unread.
_MAX_CREDENTIAL = 4096
_OPT_SOCKET = 8  # MUNGE_OPT_SOCKET in munge.h
_lib: ctypes.CDLL | None = None


def _libmunge() -> ctypes.CDLL:
    """libmunge, loaded once, with the prototypes of the functions used."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("munge") or "libmunge.so.2")
        except OSError as exc:
            raise AuthError(f"cannot check MUNGE credentials: libmunge not found ({exc})") from exc
        lib.munge_ctx_create.restype = ctypes.c_void_p
        lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
        lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
        lib.munge_ctx_strerror.restype = ctypes.c_char_p
        lib.munge_decode.argtypes = [ctypes.c_char_p, ctypes.c_void_p, *[ctypes.c_void_p] * 4]
        lib.munge_decode.restype = ctypes.c_int
        _lib = lib
    return _lib


def _set_socket(lib: ctypes.CDLL, ctx: int, socket: str) -> int:
    # munge_ctx_set is variadic: every argument typed by hand (an untyped int is 32 bits).
    opt = ctypes.c_int(_OPT_SOCKET)
    return int(lib.munge_ctx_set(ctypes.c_void_p(ctx), opt, ctypes.c_char_p(socket.encode())))


def _libc_free(pointer: ctypes.c_void_p) -> None:
    """free(3) a buffer libmunge allocated."""
    free = ctypes.CDLL(None).free
    free.argtypes = [ctypes.c_void_p]
    free(pointer)


def user_name(uid: int) -> str:
    """The login name of ``uid`` (the numeric id if it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def header(socket: str | None = None) -> str:
    """The Authorization header value for one request."""
    return f"{SCHEME} {encode(socket)}"
