"""Stage-out: write a finished job's declared outputs back to the store, verified, losing nothing.

Pure decisions (which outputs run, which key each file gets, where a replaced object goes)
sit beside the agent-side walk of the job directory and the upload loop.

Exactly once, by construction: every file is compared with what is already at its key
(size + MD5). Identical: nothing to do (a restarted stage-out skips what arrived before).
Different: the old object is first copied to the recycle bin under a key fixed by the job
(``<trash_prefix><YYYY-MM-DD of the job's end>/<jobid>/<key>``), then replaced. Repeating any
step after a crash gives the same result, so the daemon simply runs the whole stage-out again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hpcstage.errors import HpcstageError

SUCCESS_STATES = frozenset({"COMPLETED"})


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


@dataclass(frozen=True)
class Refused:
    """A file under SRC that should be uploaded but cannot be: the stage-out fails naming it.

    ``rel`` is printable (see ``shown``): it goes into messages and the database as is.
    """

    rel: str
    reason: str


def shown(text: str) -> str:
    """``text`` as UTF-8 that can be printed and stored: a byte of a file name that is not
    UTF-8 (which os gives as a lone surrogate) becomes the four characters ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escape it as itself
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str:
    """Why the file name ``name`` (as os decodes it) cannot be an object key; "" if it can.

    S3 keys are UTF-8. A name with other bytes is refused by name rather than renamed: a
    silently changed key would be a different output than the one the job wrote.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8 (object keys are): rename it to stage it out"
    return ""


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


def trash_key(trash_prefix: str, ended_at: float, job: str, key: str) -> str:
    """Where the object replaced at ``key`` by ``job`` is kept (same bucket)."""
    day = time.strftime("%Y-%m-%d", time.gmtime(ended_at))
    return f"{trash_prefix}{day}/{job}/{key}"


def walk(view: Path, src: PurePosixPath, dest_key: str) -> Iterator[Output | Skipped | Refused]:
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


def _walk_dir(view: Path, top: Path, dest_key: str) -> Iterator[Output | Skipped | Refused]:
    stack = [top]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and (problem := name_problem(entry.name)):
                    rel = shown(path.relative_to(view).as_posix())
                    yield Refused(rel, f"{problem}; nothing in this directory is staged out")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
                    continue
                rel_in_src = path.relative_to(top).as_posix()
                yield _one(view, path, st, key_for(dest_key, True, rel_in_src, path.name))


def _one(view: Path, path: Path, st: os.stat_result, key: str) -> Output | Skipped | Refused:
    rel = path.relative_to(view).as_posix()
    if stat.S_ISLNK(st.st_mode):
        return Skipped(shown(rel), f"symlink to '{shown(os.readlink(path))}' not followed")
    if not stat.S_ISREG(st.st_mode):
        return Skipped(shown(rel), "not a regular file (device, FIFO or socket)")
    if problem := name_problem(rel):
        return Refused(shown(rel), problem)
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


def same_object(etag: str, size: int, md5_hex: str, local_size: int) -> bool:
    """True when the stored object is the local file: same size and, for a plain ETag, MD5.

    A multipart ETag ("...-N") is no MD5 of the content; size alone would be a guess, so such
    an object is treated as different (it then goes to the recycle bin: nothing is lost).
    """
    return size == local_size and "-" not in etag and etag.lower() == md5_hex
