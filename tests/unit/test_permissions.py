"""Whether a job's user may read a shared-filesystem path (hpcstage.agent.permissions): the
kernel's rules for mode bits and POSIX access ACLs, on real files with real ACLs (setfacl),
checked for uids that are not ours. Tests run as root, who may read anything, so the
checked people are made-up uids."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.agent.permissions import (
    GROUP_OBJ,
    MASK,
    OTHER,
    READ,
    USER,
    USER_OBJ,
    Entry,
    Person,
    Reader,
    allowed,
    parse_acl,
)
from hpcstage.errors import PermissionRefused

OWNER, ALICE, BOB = 41001, 41002, 41003
PROJECT = 42000
alice = Person("alice", ALICE, frozenset({ALICE}))
bob = Person("bob", BOB, frozenset({BOB, PROJECT}))


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory everyone may enter (pytest's own are 0700, which no one else passes)."""
    path = Path(tempfile.mkdtemp(prefix="hpcstage-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _file(tmp: Path, mode: int, *acl: str) -> Path:
    path = tmp / "data.bin"
    path.write_bytes(b"x")
    os.chown(path, OWNER, PROJECT)
    path.chmod(mode)
    for spec in acl:
        subprocess.run(["setfacl", "-m", spec, str(path)], check=True)
    return path


def _may(path: Path, who: Person) -> bool:
    try:
        Reader(who).check_file(str(path))
    except PermissionRefused:
        return False
    return True


def test_mode_bits_decide_without_an_acl(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o640)
    assert not _may(path, alice)  # other: ---
    assert _may(path, bob)  # in the owning group: r--
    path.chmod(0o604)
    assert _may(path, alice) and not _may(path, bob)  # the group class decides for bob: ---


def test_a_named_user_entry_grants_within_the_mask(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o600, f"u:{ALICE}:r")
    assert _may(path, alice)
    subprocess.run(["setfacl", "-m", "m::-", str(path)], check=True)
    assert not _may(path, alice)  # the mask removes it


def test_a_named_group_entry_grants_and_a_named_user_entry_wins_over_it(tmp_path: Path) -> None:
    path = _file(tmp_path, 0o600, f"g:{PROJECT}:r")
    assert _may(path, bob) and not _may(path, alice)
    subprocess.run(["setfacl", "-m", f"u:{BOB}:-", str(path)], check=True)
    assert not _may(path, bob)  # a named-user entry is checked before any group


def test_every_directory_on_the_way_must_be_searchable(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    path = _file(private, 0o644)
    os.chown(private, OWNER, OWNER)
    private.chmod(0o700)
    with pytest.raises(PermissionRefused, match=f"{private}: alice may not enter it"):
        Reader(alice).check_file(str(path))
    subprocess.run(["setfacl", "-m", f"u:{ALICE}:x", str(private)], check=True)
    Reader(alice).check_file(str(path))  # search is enough to read a file by name


def test_a_staged_directory_must_be_listable_down_to_each_file(tmp_path: Path) -> None:
    top = tmp_path / "set"
    sub = top / "sub"
    sub.mkdir(parents=True)
    path = _file(sub, 0o644)
    for d in (top, sub):
        os.chown(d, OWNER, OWNER)
    top.chmod(0o755)
    sub.chmod(0o711)  # enterable, not listable
    reader = Reader(alice)
    reader.check_dir(str(top))
    with pytest.raises(PermissionRefused, match="may not list it"):
        reader.check_file(str(path), str(top))
    Reader(alice).check_file(str(path))  # named on its own, it may be read


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    assert not _may(fifo, alice)


def test_root_and_the_owner() -> None:
    st = os.stat_result((0o100000, 0, 0, 1, OWNER, PROJECT, 1, 0, 0, 0))
    assert allowed(st, None, Person("root", 0, frozenset()), READ)
    owner = Person("o", OWNER, frozenset())
    assert not allowed(st, None, owner, READ)  # mode 000: not even the owner
    acl = [Entry(USER_OBJ, 4), Entry(GROUP_OBJ, 0), Entry(MASK, 0), Entry(OTHER, 0)]
    assert allowed(st, acl, owner, READ)  # the owner entry is not limited by the mask
    assert not allowed(st, [*acl, Entry(USER, 4, ALICE)], alice, READ)  # the mask is


def test_acl_values_are_parsed_and_malformed_ones_refused() -> None:
    blob = bytes.fromhex("0200000001000600ffffffff020004003930000004000400ffffffff")
    assert parse_acl(blob)[1] == Entry(USER, 4, 12345)
    for bad in (b"", bytes.fromhex("03000000"), blob[:-1]):
        with pytest.raises(ValueError, match="POSIX ACL"):
            parse_acl(bad)


def test_an_unknown_user_is_refused_by_name() -> None:
    with pytest.raises(PermissionRefused, match="'no-such-user-x' is unknown on this node"):
        Person.named("no-such-user-x")
