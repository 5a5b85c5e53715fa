"""Stage-out: write a finished job's declared outputs back to the store, verified, losing nothing.

Pure decisions: which outputs run, which key each file gets, which files may be uploaded,
where a replaced object goes. The agent's walk of the job directory is in transfer/jobdir.py,
its upload loop in transfer/uploader.py.

Exactly once, by construction: every file is compared with what is already at its key
(size + MD5). Identical: nothing to do (a restarted stage-out skips what arrived before).
Different: the old object is first copied to the recycle bin under a key fixed by the job and
the version it holds (``<trash_prefix><YYYY-MM-DD of the job's end>/<jobid>~<ETag>/<key>``),
then replaced on condition that the key still holds that version (hpcstage.store.recycle). Repeating
any step after a crash gives the same result, so the daemon simply runs the whole stage-out
again; a version someone else wrote meanwhile gets its own copy in the bin.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass

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


def file_problem(st: os.stat_result, dev: int, job_uid: int, service_uid: int) -> str:
    """Why the file ``st`` (its stat) is not uploaded for a job of ``job_uid``; "" if it is.

    Uploaded: a regular file on the job directory's file system ``dev`` owned by the job's
    user, or a file of the service account that everybody may read: an input the cache linked
    into the job's directory (its objects are 0444), which a job may write back. Anything else
    (another user's file, the cache's own 0600 index) reached the directory in a way its user
    should not have (a hardlink where fs.protected_hardlinks is off) and is refused.
    """
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (device, FIFO or socket)"
    if st.st_dev != dev:
        return "on another file system than the job directory"
    if st.st_uid == job_uid or (st.st_uid == service_uid and st.st_mode & stat.S_IROTH):
        return ""
    return f"owned by uid {st.st_uid}, not by the job's user (uid {job_uid})"


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
