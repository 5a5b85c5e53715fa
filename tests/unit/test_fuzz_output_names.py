"""Hostile-input fuzzing of file names in output directories (issue 15, "Must show"): what the
stage-out walk (transfer/jobdir.py) makes of a generated tree, checked for its OUTCOME.

test_jobdir.py::test_every_file_name_is_staged_exactly_or_refused_by_name covers flat
directories of short names. Here: nested trees, whose directories may have odd names too,
names of up to 255 bytes, control characters, bytes that are not UTF-8 anywhere on the path,
symlinks among the files. For every file exactly one of:

- an Output whose key is the stage-out DEST followed by the file's path under SRC, byte-exact,
  no other file's key, whose bytes read through JobDir.open are the file's; or
- a Refused naming it (or naming the directory it is in, which is then refused whole), with a
  reason, in text that is valid UTF-8; or
- a Skipped naming it (a symlink: never followed, never uploaded).

Nothing is dropped silently. A key over S3's 1024 bytes (a deep tree) is listed like any other:
the store refuses the upload, naming it (AWS: KeyTooLongError; rclone stores it).

Settings: derandomize=True, so that CI runs the same examples every time.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpcstage.agent.jobdir import JobDir, Owners
from hpcstage.cli.status_view import job_text as _job_text
from hpcstage.cli.status_view import jobs_table as _jobs_table
from hpcstage.core.directives import MAX_NAME_BYTES
from hpcstage.core.stageout import Output, Refused, Skipped

FUZZ = settings(
    deadline=None,
    max_examples=150,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ME = os.geteuid()

NAME_PIECES = [
    b"a", b"B", b".", b" ", b"%", b"%2F", b"+", b"#", b"?", b"'", b'"', b"\\", b"*", b"~",
    "é".encode(), "e\u0301".encode(), "日本".encode(), "😀".encode(), "\u202e".encode(),
    b"\n", b"\r", b"\t", b"\x1b", b"\x7f", "\x85".encode(),
    b"\xff", b"\xfe", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf",  # not UTF-8 (incl. overlong '/')
]  # fmt: skip
name = st.one_of(
    st.lists(st.sampled_from(NAME_PIECES), min_size=1, max_size=5).map(b"".join),
    st.sampled_from([b"a" * 255, "é".encode() * 127 + b"a", b"...", b".hidden", b"-"]),
).filter(lambda n: n not in (b".", b"..") and len(n) <= MAX_NAME_BYTES)
tree = st.lists(st.lists(name, min_size=1, max_size=4).map(tuple), min_size=1, max_size=8)
DEST = "p/é b/"


def utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def build(out: bytes, paths: list[tuple[bytes, ...]]) -> dict[tuple[bytes, ...], bytes]:
    """Make the files (contents: their own path), skipping paths that clash with a directory
    made for another; returns the files made."""
    made: dict[tuple[bytes, ...], bytes] = {}
    dirs: set[tuple[bytes, ...]] = set()
    for path in paths:
        parents = {path[:i] for i in range(1, len(path))}
        if path in dirs or path in made or parents & set(made):
            continue
        os.makedirs(os.path.join(out, *path[:-1]), exist_ok=True)
        dirs |= parents
        content = b"/".join(path)
        with open(os.path.join(out, *path), "wb") as f:
            f.write(content)
        made[path] = content
    return made


def shown_rel(path: tuple[bytes, ...]) -> str:
    return "out/" + b"/".join(path).decode("utf-8", "backslashreplace")


@FUZZ
@given(tree)
@example([(b"dir\xff", b"in.txt"), (b"ok", b"a\nb"), (b"ok", "é".encode() * 127 + b"a")])
@example([(b"a" * 255, b"b" * 255, b"c" * 255, b"d" * 255, b"e" * 200)])  # a 1,200-byte key
def test_every_file_in_a_tree_is_staged_exactly_or_refused_by_name(
    paths: list[tuple[bytes, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(os.fsencode(tmp), b"out")
        os.mkdir(out)
        made = build(out, paths)
        os.symlink(b"/etc/passwd", os.path.join(out, b"link\xff\n"))
        with JobDir(Path(tmp), Owners(ME, ME)) as jobdir:
            found = list(jobdir.walk(PurePosixPath("out"), DEST))
            read = {}
            for item in found:
                if isinstance(item, Output):
                    fd, _ = jobdir.open(item.rel)
                    try:
                        read[item.key] = os.pread(fd, 1 << 16, 0)
                    finally:
                        os.close(fd)
    outputs = [f for f in found if isinstance(f, Output)]
    refused = {f.rel: f.reason for f in found if isinstance(f, Refused)}
    skipped = {f.rel: f.reason for f in found if isinstance(f, Skipped)}
    assert len({o.key for o in outputs}) == len(outputs)  # no two files share a key
    for item in (*refused, *refused.values(), *skipped, *skipped.values()):
        item.encode("utf-8")  # printable as text, storable in the database
    assert skipped == {"out/link\\xff\n": "symlink to '/etc/passwd' not followed"}

    expected_keys = set()
    for path, content in made.items():
        bad = next((i for i, part in enumerate(path) if utf8(part) is None), None)
        if bad is None:  # all UTF-8: uploaded under exactly its name, with its bytes
            key = DEST + "/".join(part.decode() for part in path)
            assert read[key] == content, ascii(key)
            expected_keys.add(key)
        else:  # refused by the name of the first odd part (a directory: refused whole)
            reason = refused[shown_rel(path[: bad + 1])]
            assert "not UTF-8" in reason, reason
            if bad < len(path) - 1:
                assert "nothing in this directory is staged out" in reason
    assert {o.key for o in outputs} == expected_keys  # and nothing else
    for output in outputs:
        assert output.key.encode() == DEST.encode() + output.rel.encode()[len(b"out/") :]


# --- what `hpcstage status` shows of them ---------------------------------------------------

# A job chooses its name and the names of its files (and the targets of its symlinks, and so
# part of every error about them); an admin runs `hpcstage status` on any job.
HOSTILE_PIECES = [
    "x", " ", "\n", "\r", "\t", "\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "\x00", "\x7f",
    "\u2028", "\u202e", "é", "\\xff", "%",
]  # fmt: skip
hostile_text = st.lists(st.sampled_from(HOSTILE_PIECES), max_size=6).map("".join)


def job_doc(text: list[str]) -> dict[str, Any]:
    """A status document (hpcstage.api.status.job_document's shape) with ``text`` in every field
    a job can influence."""
    (name, path, key, error, target, message) = text
    files = [
        {"path": f"out/{path}", "key": key, "size": 1, "state": "skipped", "trash_key": "",
         "error": f"symlink to '{target}' not followed"},
        {"path": f"out/{path}2", "key": key, "size": 1, "state": "failed", "trash_key": "",
         "error": error},
        {"path": f"out/{path}3", "key": key, "size": 1, "state": "uploaded",
         "trash_key": f"trash/{key}", "error": ""},
    ]  # fmt: skip
    node = {
        "state": "failed", "files_done": 1, "files_total": 3, "bytes_done": 1, "bytes_total": 3,
        "fetched_files": 0, "peer_files": 0, "error": error, "files": files,
    }  # fmt: skip
    return {
        "id": 1, "kind": "job", "job_id": 7, "name": name, "user": "alice", "account": "chem",
        "state": "COMPLETED", "reason": "", "planned_nodes": [], "nodes": ["n1"],
        "directive_source": "admin_comment", "error": error, "stage_out": "failed",
        "staging": {"n1": "failed"}, "failure": error,
        "requests": [
            {"direction": "out", "src": path, "dest": f"s3://b/{key}", "line": 3,
             "text": f"--stage-out={path}:s3://b/{key}", "nodes": {"n1": node}}
        ],
        "events": [{"ts": 0.0, "node": "n1", "level": "error", "message": message}],
    }  # fmt: skip


TERMINAL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # all but '\n'


@FUZZ
@given(st.lists(hostile_text, min_size=6, max_size=6))
@example(["\x1b]0;pwned\x07", "\x1b[2J", "k\nREFUSED: forged line", "e\r", "/t\x1b", "m\n"])
def test_status_shows_hostile_names_escaped_on_lines_of_their_own(text: list[str]) -> None:
    plain = _job_text(job_doc(["x" if t else "" for t in text]))  # the same lines, tame
    shown_text = _job_text(job_doc(text))
    # No byte a terminal acts on (title, clear screen, cursor), no line a name made up.
    assert not TERMINAL.search(shown_text), ascii(shown_text)
    assert shown_text.count("\n") == plain.count("\n"), shown_text
    table = _jobs_table([job_doc(text)])
    assert not TERMINAL.search(table) and table.count("\n") == 1, ascii(table)
