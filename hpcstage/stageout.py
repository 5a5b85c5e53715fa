"""Stage-out: write a finished job's declared outputs back to the store, verified, losing nothing.

Pure decisions (which outputs run, which key each file gets, where a replaced object goes)
sit beside the agent-side walk of the job directory and the upload loop.

Exactly once, by construction: every file is compared with what is already at its key
(size + MD5). Identical: nothing to do (a restarted stage-out skips what arrived before).
Different: the old object is first copied to the recycle bin under a key fixed by the job and
the version it holds (``<trash_prefix><YYYY-MM-DD of the job's end>/<jobid>~<ETag>/<key>``),
then replaced on condition that the key still holds that version (hpcstage.recycle). Repeating
any step after a crash gives the same result, so the daemon simply runs the whole stage-out
again; a version someone else wrote meanwhile gets its own copy in the bin.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpcstage.errors import HpcstageError

SUCCESS_STATES = frozenset({"COMPLETED"})
VERSION_MARK = "~"  # between the job and the version in a recycle-bin key (no job id has one)
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
_NOT_IN_TAG = re.compile(r"[^0-9A-Za-z-]")


@dataclass(frozen=True)
class Output:
    """One regular file to upload: its path relative to the job directory and its key."""

    rel: str
    key: str
    size: int


@dataclass(frozen=True)
class Skipped:
    """Something under SRC that is not uploaded, and why (reported in status)."""

    rel: str
    reason: str


def should_run(when: str, job_state: str, site_states: frozenset[str]) -> tuple[bool, str]:
    """Whether a stage-out directive runs for a job that ended in ``job_state``, and why not."""
    if job_state == "GONE":
        # We never saw the end state (the daemon was down past MinJobAge). Skipping would
        # delete the outputs with the job directory; uploading loses nothing (what it
        # replaces goes to the recycle bin), so every directive runs, conditional or not.
        return True, ""
    if job_state not in site_states:
        return False, f"site does not stage out jobs that end {job_state}"
    success = job_state in SUCCESS_STATES
    if when == "success" and not success:
        return False, f"directive asks for on=success; job ended {job_state}"
    if when == "failure" and success:
        return False, "directive asks for on=failure; job completed"
    return True, ""


def key_for(dest_key: str, src_is_dir: bool, rel_in_src: str, src_name: str) -> str:
    """The object key of one file: under a prefix DEST (ends with '/') or at DEST itself."""
    if dest_key.endswith("/") or dest_key == "":
        return dest_key + (rel_in_src if src_is_dir else src_name)
    return f"{dest_key}/{rel_in_src}" if src_is_dir else dest_key


def trash_key(trash_prefix: str, ended_at: float, job: str, key: str, etag: str) -> str:
    """Where the version ``etag`` of the object at ``key``, replaced by ``job``, is kept.

    The version is part of the name, so a copy found there on a retry is a copy of that
    version, never of an older one the key held before someone else rewrote it.
    """
    day = time.strftime("%Y-%m-%d", time.gmtime(ended_at))
    return f"{trash_prefix}{day}/{job}{VERSION_MARK}{version_tag(etag)}/{key}"


def version_tag(etag: str) -> str:
    """An ETag as one path segment: what a (hostile) store sends must not add a '/'."""
    return _NOT_IN_TAG.sub("", etag)[:80] or "none"


def walk(view: Path, src: PurePosixPath, dest_key: str) -> Iterator[Output | Skipped]:
    """The files under ``view/src`` to upload, never leaving the job directory.

    Symlinks are not followed (one pointing outside the job directory would otherwise upload
    e.g. /etc/passwd); devices, FIFOs and sockets are skipped. Each skip is reported.
    """
    if ".." in src.parts or src.is_absolute():
        raise HpcstageError(f"stage-out source {src} leaves the job directory")
    _check_parents(view, src)
    top = view / src
    try:
        st = os.lstat(top)
    except FileNotFoundError as exc:
        raise HpcstageError(f"stage-out source {src} does not exist in the job directory") from exc
    if stat.S_ISDIR(st.st_mode):
        yield from _walk_dir(view, top, dest_key)
    else:
        yield _one(view, top, st, key_for(dest_key, False, "", top.name))


def _check_parents(view: Path, src: PurePosixPath) -> None:
    """Refuse a SRC whose directories include a symlink (``a -> /`` then ``a/etc``)."""
    current = view
    for part in src.parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # walk() reports the missing source
        if not stat.S_ISDIR(st.st_mode):
            raise HpcstageError(
                f"stage-out source {src}: {current.relative_to(view)} is not a directory "
                "inside the job directory (symlinks are not followed)"
            )


def _walk_dir(view: Path, top: Path, dest_key: str) -> Iterator[Output | Skipped]:
    stack = [top]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
                    continue
                rel_in_src = path.relative_to(top).as_posix()
                yield _one(view, path, st, key_for(dest_key, True, rel_in_src, path.name))


def _one(view: Path, path: Path, st: os.stat_result, key: str) -> Output | Skipped:
    rel = path.relative_to(view).as_posix()
    if stat.S_ISLNK(st.st_mode):
        return Skipped(rel, f"symlink to {os.readlink(path)!r} not followed")
    if not stat.S_ISREG(st.st_mode):
        return Skipped(rel, "not a regular file (device, FIFO or socket)")
    return Output(rel, key, st.st_size)


def file_digests(path: Path) -> tuple[str, str]:
    """(MD5, SHA-256) of a file, opened without following a symlink."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def same_object(
    etag: str,
    size: int,
    md5_hex: str,
    local_size: int,
    *,
    etag_is_md5: bool = True,
    stored_sha256: str = "",
    sha256_hex: str = "",
) -> bool:
    """True when the stored object is the local file: same size, and the same content by
    the best evidence there is.

    A plain ETag is the MD5 of the content unless the object is encrypted with SSE-KMS or
    SSE-C (``etag_is_md5`` False): then, as for a multipart ETag ("...-N", no MD5 of the
    content), the SHA-256 hpcstage recorded in the object's metadata when it uploaded it
    decides (``stored_sha256``). Without it, size alone would be a guess: the object is
    treated as different (it then goes to the recycle bin: nothing is lost).
    """
    if size != local_size:
        return False
    if etag_is_md5 and _PLAIN_MD5.fullmatch(etag.lower()):
        return etag.lower() == md5_hex
    return bool(stored_sha256) and stored_sha256 == sha256_hex
