"""The stage-out walk and open of a job directory (transfer/jobdir.py) on a real directory:
what is listed, skipped and refused, and that an output swapped after it was listed (for a
symlink, a FIFO, a socket, another user's file) is refused on open without blocking, while
the bytes of the file that was checked are the ones read."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcstage.agent.jobdir import JobDir, Owners, digests
from hpcstage.core.stageout import Output, Refused, Skipped, file_problem, name_problem
from hpcstage.errors import HpcstageError, UnsafeFileError

ME = os.geteuid()
OTHER_UID = 4242


@pytest.fixture
def view(tmp_path: Path) -> Path:
    found = tmp_path / "view"
    (found / "out" / "sub").mkdir(parents=True)
    (found / "out" / "a.txt").write_text("alpha")
    (found / "out" / "sub" / "b.txt").write_text("beta!")
    (found / "secret").mkdir()
    (found / "secret" / "b.txt").write_text("SECRET")  # stands for another user's directory
    return found


@pytest.fixture
def jobdir(view: Path) -> Iterator[JobDir]:
    with JobDir(view, Owners(ME, ME)) as opened:
        yield opened


def walked(jobdir: JobDir, src: str = "out") -> list[Output | Skipped | Refused]:
    return list(jobdir.walk(PurePosixPath(src), "p/"))


def read_all(jobdir: JobDir, rel: str) -> bytes:
    fd, _ = jobdir.open(rel)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_files_are_listed_with_their_keys(jobdir: JobDir) -> None:
    assert walked(jobdir) == [
        Output("out/a.txt", "p/a.txt", 5),
        Output("out/sub/b.txt", "p/sub/b.txt", 5),
    ]
    assert walked(jobdir, "out/a.txt") == [Output("out/a.txt", "p/a.txt", 5)]
    assert read_all(jobdir, "out/sub/b.txt") == b"beta!"


def test_symlinks_fifos_and_sockets_are_skipped_by_name(view: Path, jobdir: JobDir) -> None:
    (view / "out" / "link").symlink_to(view / "secret")
    (view / "out" / "passwd").symlink_to("/etc/passwd")
    os.mkfifo(view / "out" / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(view / "out" / "sock"))
        found = {f.rel: f for f in walked(jobdir)}
    assert found["out/link"] == Skipped("out/link", f"symlink to '{view}/secret' not followed")
    assert found["out/passwd"] == Skipped("out/passwd", "symlink to '/etc/passwd' not followed")
    for special in ("out/pipe", "out/sock"):
        assert isinstance(found[special], Skipped), found[special]
    assert not any("secret" in f.rel for f in found.values())


def test_a_symlinked_directory_on_the_source_path_is_refused(view: Path, jobdir: JobDir) -> None:
    (view / "a").symlink_to(view / "secret")
    with pytest.raises(HpcstageError, match="a is not a directory inside the job directory"):
        walked(jobdir, "a/b.txt")
    with pytest.raises(HpcstageError, match="does not exist"):
        walked(jobdir, "missing")
    with pytest.raises(HpcstageError, match="leaves the job directory"):
        walked(jobdir, "../secret")


def test_a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed(
    view: Path, jobdir: JobDir
) -> None:
    listed = walked(jobdir)
    assert Output("out/sub/b.txt", "p/sub/b.txt", 5) in listed
    (view / "out" / "sub").rename(view / "out" / "sub.real")
    (view / "out" / "sub").symlink_to(view / "secret")  # secret/b.txt has the listed name
    with pytest.raises(UnsafeFileError, match="a directory on its path is now a symlink"):
        jobdir.open("out/sub/b.txt")


def test_a_file_swapped_for_a_symlink_after_the_walk_is_not_followed(
    view: Path, jobdir: JobDir
) -> None:
    walked(jobdir)
    (view / "out" / "a.txt").unlink()
    (view / "out" / "a.txt").symlink_to(view / "secret" / "b.txt")
    with pytest.raises(UnsafeFileError, match="the file is now a symlink"):
        jobdir.open("out/a.txt")


def _open_in_thread(jobdir: JobDir, rel: str) -> BaseException | None:
    """jobdir.open(rel) in a thread that must come back within seconds (a FIFO blocked it)."""
    found: list[BaseException | None] = []

    def run() -> None:
        try:
            os.close(jobdir.open(rel)[0])
            found.append(None)
        except BaseException as exc:
            found.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), f"opening {rel} blocked"
    return found[0]


def test_a_file_swapped_for_a_fifo_is_refused_without_blocking(view: Path, jobdir: JobDir) -> None:
    walked(jobdir)
    (view / "out" / "a.txt").unlink()
    os.mkfifo(view / "out" / "a.txt")  # nobody writes to it: a blocking open would hang
    refused = _open_in_thread(jobdir, "out/a.txt")
    assert isinstance(refused, UnsafeFileError) and "not a regular file" in str(refused)


def test_a_file_swapped_for_a_socket_is_refused(view: Path, jobdir: JobDir) -> None:
    walked(jobdir)
    (view / "out" / "a.txt").unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(view / "out" / "a.txt"))
        refused = _open_in_thread(jobdir, "out/a.txt")
    assert isinstance(refused, UnsafeFileError) and "not a regular file" in str(refused)


@pytest.mark.skipif(ME != 0, reason="giving a file to another uid needs root")
def test_a_file_of_another_user_is_refused_when_listed_and_when_opened(
    view: Path, tmp_path: Path
) -> None:
    os.chown(view / "out" / "a.txt", OTHER_UID, -1)
    # The job's user is us; the service account someone else: only our files go.
    with JobDir(view, Owners(ME, OTHER_UID + 1)) as jobdir:
        found = {f.rel: f for f in walked(jobdir)}
        assert found["out/a.txt"] == Refused(
            "out/a.txt", f"owned by uid {OTHER_UID}, not by the job's user (uid {ME})"
        )
        with pytest.raises(UnsafeFileError, match=f"owned by uid {OTHER_UID}"):
            jobdir.open("out/a.txt")


def test_digests_read_the_open_file_not_what_its_path_names_later(
    view: Path, jobdir: JobDir
) -> None:
    fd, _ = jobdir.open("out/a.txt")
    try:
        (view / "out" / "other").write_text("something else entirely")
        (view / "out" / "other").replace(view / "out" / "a.txt")
        md5, sha = digests(fd)
    finally:
        os.close(fd)
    assert (md5, sha[:12]) == ("2c1743a391305fbf367df8e4f069f9f9", "8ed3f6ad685b")


def test_the_walk_refuses_names_that_are_not_utf8_and_lists_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / os.fsdecode(b"dir\xfe")).mkdir(parents=True)
    (out / os.fsdecode(b"dir\xfe") / "inside.txt").write_text("x")
    (out / os.fsdecode(b"bad\xff.txt")).write_text("x")
    (out / "ok.txt").write_text("fine")
    with JobDir(tmp_path, Owners(ME, ME)) as jobdir:
        found = walked(jobdir)
    assert found == [
        Refused("out/bad\\xff.txt", name_problem(os.fsdecode(b"\xff"))),
        Refused(
            "out/dir\\xfe",
            name_problem(os.fsdecode(b"\xfe")) + "; nothing in this directory is staged out",
        ),
        Output("out/ok.txt", "p/ok.txt", 4),
    ]


def _st(mode: int, uid: int, dev: int = 1) -> os.stat_result:
    return os.stat_result((mode, 1, dev, 1, uid, 0, 10, 0, 0, 0))


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (_st(stat.S_IFREG | 0o600, 1000), ""),  # the job user's own file, private or not
        (_st(stat.S_IFREG | 0o444, 999), ""),  # an input the cache linked in
        (_st(stat.S_IFREG | 0o600, 999), "owned by uid 999, not by the job's user (uid 1000)"),
        (_st(stat.S_IFREG | 0o644, 1001), "owned by uid 1001, not by the job's user (uid 1000)"),
        (_st(stat.S_IFREG | 0o644, 1000, dev=2), "on another file system than the job directory"),
        (_st(stat.S_IFIFO | 0o644, 1000), "not a regular file (device, FIFO or socket)"),
        (_st(stat.S_IFCHR | 0o644, 1000), "not a regular file (device, FIFO or socket)"),
        (_st(stat.S_IFSOCK | 0o644, 1000), "not a regular file (device, FIFO or socket)"),
    ],
)
def test_which_files_a_job_may_upload(status: os.stat_result, problem: str) -> None:
    assert file_problem(status, dev=1, job_uid=1000, service_uid=999) == problem


# Any bytes but NUL and '/' can name a file: each is either staged under its exact name, or
# refused naming it with its odd bytes escaped; nothing is dropped silently, nothing crashes.
file_names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"\0" not in b and b"/" not in b and b not in (b".", b"..")
)


@settings(max_examples=150, deadline=None)
@given(st.lists(file_names, min_size=1, max_size=6, unique=True))
def test_every_file_name_is_staged_exactly_or_refused_by_name(names: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(os.fsencode(tmp), b"out")
        os.mkdir(out)
        for name in names:
            with open(os.path.join(out, name), "wb") as f:
                f.write(name)
        with JobDir(Path(tmp), Owners(ME, ME)) as jobdir:
            found = walked(jobdir)
            staged = {f.key: read_all(jobdir, f.rel) for f in found if isinstance(f, Output)}
    refused = {f.rel: f.reason for f in found if isinstance(f, Refused)}
    assert len(staged) + len(refused) == len(names) == len(found)
    for name in names:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            shown_name = "out/" + name.decode("utf-8", "backslashreplace")
            assert "not UTF-8" in refused[shown_name]
            shown_name.encode("utf-8")  # storable and printable
        else:
            assert staged[f"p/{text}"] == name  # the key is the name, the bytes the file's
