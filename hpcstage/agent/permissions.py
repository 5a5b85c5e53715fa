"""May the job's user read this shared-filesystem path? POSIX mode bits and access ACLs.

The agent reads shared-filesystem sources as the service account, which a site often lets
read far more than any one user (an ACL on every project directory, say). Staging a path
the policy's prefix covers must not hand a user a file they could not read themselves, so
the agent asks, for the job's user, the question the kernel would: search permission on
every directory on the way and read permission on the file, by the owner, named-user,
group and other entries of the access ACL (``system.posix_acl_access``) and its mask, or
by the mode bits where there is no ACL. The decision (``allowed``) is pure; ``Reader``
gathers the facts from the filesystem and remembers directory verdicts for a walk.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

from hpcstage.errors import PermissionRefused

READ, WRITE, SEARCH = 4, 2, 1

# Tags of the Linux posix_acl_xattr format (linux/posix_acl_xattr.h), version 2.
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_XATTR = "system.posix_acl_access"


@dataclass(frozen=True)
class Person:
    """Whom to check for: a uid and every group it belongs to."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Person:
        """The user ``name`` as this node's NSS knows them; PermissionRefused if unknown."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            raise PermissionRefused(
                f"user {name!r} is unknown on this node: cannot check what they may read"
            ) from exc
        groups = os.getgrouplist(name, entry.pw_gid)
        return cls(name, entry.pw_uid, frozenset(groups))


@dataclass(frozen=True)
class Entry:
    """One access ACL entry."""

    tag: int
    perm: int
    qualifier: int = -1


def parse_acl(blob: bytes) -> list[Entry]:
    """The entries of a ``system.posix_acl_access`` value; ValueError if malformed."""
    if len(blob) < _HEADER.size or (len(blob) - _HEADER.size) % _ENTRY.size:
        raise ValueError("malformed POSIX ACL")
    (version,) = _HEADER.unpack_from(blob)
    if version != 2:
        raise ValueError(f"unknown POSIX ACL version {version}")
    offsets = range(_HEADER.size, len(blob), _ENTRY.size)
    return [Entry(*_ENTRY.unpack_from(blob, at)) for at in offsets]


def allowed(st: os.stat_result, acl: list[Entry] | None, who: Person, want: int) -> bool:
    """Whether ``who`` has every bit of ``want`` on a file with ``st`` and access ``acl``.

    The order is the kernel's: owner, then named users, then the owning and named groups
    (any one matching entry that grants all of ``want``), then other. Named users and all
    group entries are limited by the mask.
    """
    if who.uid == 0:
        return True  # root reads everything; a root job is the site's own business
    if not acl:
        return _by_mode(st, who, want)
    mask = next((e.perm for e in acl if e.tag == MASK), 7)
    if who.uid == st.st_uid:
        return _has(_perm(acl, USER_OBJ), want)
    named = [e for e in acl if e.tag == USER and e.qualifier == who.uid]
    if named:
        return _has(named[0].perm & mask, want)
    groups = [
        e
        for e in acl
        if (e.tag == GROUP_OBJ and st.st_gid in who.gids)
        or (e.tag == GROUP and e.qualifier in who.gids)
    ]
    if groups:
        return any(_has(e.perm & mask, want) for e in groups)
    return _has(_perm(acl, OTHER), want)


def _by_mode(st: os.stat_result, who: Person, want: int) -> bool:
    if who.uid == st.st_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in who.gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return _has(bits & 7, want)


def _perm(acl: list[Entry], tag: int) -> int:
    return next((e.perm for e in acl if e.tag == tag), 0)


def _has(perm: int, want: int) -> bool:
    return perm & want == want


class Reader:
    """Checks paths for one person, remembering each directory's verdict during a walk."""

    def __init__(self, who: Person) -> None:
        self.who = who
        self._searchable: dict[str, bool] = {}
        self._listable: dict[str, bool] = {}

    def check_file(self, path: str, top: str | None = None) -> None:
        """PermissionRefused unless ``who`` may reach and read the regular file ``path``.

        With ``top`` (a directory being staged whole), every directory from ``top`` down to
        the file's must also be listable, as ``ls -R`` would need.
        """
        parent = PurePosixPath(path).parent
        self._check_dirs(str(parent))
        if top is not None:
            below = PurePosixPath(top.rstrip("/") or "/")
            for directory in [parent, *parent.parents]:
                if not directory.is_relative_to(below):
                    break
                self._check_listable(str(directory))
        if not self._may(path, READ):
            raise PermissionRefused(f"{path}: {self.who.name} may not read it")

    def check_dir(self, path: str) -> None:
        """PermissionRefused unless ``who`` may reach ``path`` and list it."""
        self._check_dirs(path)
        self._check_listable(path)

    def _check_listable(self, path: str) -> None:
        if path not in self._listable:
            self._listable[path] = self._may(path, READ)
        if not self._listable[path]:
            raise PermissionRefused(f"{path}: {self.who.name} may not list it")

    def _check_dirs(self, directory: str) -> None:
        """Search permission on ``directory`` and each of its ancestors."""
        current = PurePosixPath(directory)
        for path in [*reversed(current.parents), current]:
            key = str(path)
            if key not in self._searchable:
                self._searchable[key] = self._may(key, SEARCH)
            if not self._searchable[key]:
                raise PermissionRefused(f"{key}: {self.who.name} may not enter it")

    def _may(self, path: str, want: int) -> bool:
        st = os.stat(path)
        if want == READ and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return False
        try:
            acl = _acl_of(path)
        except ValueError:
            return False  # an ACL we cannot read grants nothing
        return allowed(st, acl, self.who, want)


def _acl_of(path: str) -> list[Entry] | None:
    """The access ACL of ``path``; None where it has none or the filesystem keeps none."""
    try:
        return parse_acl(os.getxattr(path, _XATTR))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
