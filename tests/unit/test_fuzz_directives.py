"""Hostile-input fuzzing of directives (issue 15, "Must show"): generated values, scripts and
admin_comments, each checked for its OUTCOME, not merely for not crashing.

test_hostile_directives.py holds the hand-picked attacks and test_directives.py the first
properties (nothing escapes $HPCSTAGE_DIR, the admin_comment encoding round-trips raw strings).
Here, for generated input:

- every value is either accepted, and then names only what the grammar allows (a bucket S3
  accepts, a key of at most 1024 bytes, a DEST that is exactly a normal relative path inside
  $HPCSTAGE_DIR, every component at most 255 bytes, no control character, no NUL), or refused
  with a DirectiveError naming its line in a short message without control characters;
- an accepted directive survives the way it travels byte-exact: written (quoted or escaped as
  sbatch reads it) on a #HPCSTAGE line, and through job_submit.lua's admin_comment encoding;
- examples/slurm/job_submit.lua and the daemon's own reading of a script agree on every
  generated script: both refuse it, or both find the same directives.

Settings: derandomize=True, so that CI runs the same examples every time.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hpcstage.core.directives import (
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    JobContext,
    ParsedDirectives,
    SourceKind,
    StageIn,
    StageOut,
    decode_admin_comment,
    encode_admin_comment,
    expand_stage_out,
    parse_args,
    parse_script,
    parse_value,
)
from hpcstage.errors import DirectiveError

FUZZ = settings(
    deadline=None,
    max_examples=200,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Control characters (C0, DEL, C1), lone surrogates and the line/paragraph separators: none may
# reach a message (it goes to the database, `hpcstage status` and terminals).
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
SHORT = 1000  # characters, as in test_hostile_directives.py
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# --- generators -------------------------------------------------------------------------------

# Pieces that mean something to some layer: the grammar (':', '/', '//', s3://, flags), sbatch's
# word splitting (quotes, backslash, '#', blanks), patterns and percent-encoding ('%'), paths
# ('.', '..'), Unicode look-alikes of '.' and '/', and characters no value may hold.
PIECES = [
    "s3://", "S3://", "s3:/", "gs://", "bucket", "my-bucket", "b", "Bucket", "xn--b",
    "/", "//", ":", "::", ".", "..", "...", "k", "p/", "/shared", "a b", " ", "\t",
    "'", '"', "\\", "#", "%", "%%", "%j", "%u", "%x", "%a", "%10a", "%41", "%2F", "%2e%2e", "%00",
    ";", "=", ",", "+", "?", "~", "@", "*", "on=success", "on=failure", "optional", "on=",
    "é", "e\u0301", "日本", "\u2024", "\uff0e", "\u2215", "\uff0f", "\u00a0", "\u200b", "\ufeff",
    "\x00", "\x1b", "\n", "\r", "\x7f", "\x85", "\u2028", "\udcff",
]  # fmt: skip
piece = st.sampled_from(PIECES) | st.text(max_size=3)
value_text = st.lists(piece, max_size=16).map("".join)
long_run = st.builds(
    lambda c, n: c * n, st.sampled_from(["a", "é", "/", "a/", "../"]), st.integers(1, 1500)
)
values = value_text | st.builds("".join, st.lists(value_text | long_run, max_size=3))

# Near-valid values, so that a good share are accepted and their parts can be checked.
name_char = st.sampled_from(
    ["a", "Z", "0", "-", "_", ".", " ", "é", "e\u0301", "日", "'", '"', "\\", "#", "%",
     "%41", "+", "?", "=", ",", ";", "@", "~", "*", "$", "`", "!", "&", "(", "\u00a0", "😀"]
)  # fmt: skip
name = st.lists(name_char, min_size=1, max_size=6).map("".join) | st.sampled_from(
    ["..", ".", "", "...", "a" * 255, "é" * 128, "a" * 256]
)
rel_path = st.lists(name, min_size=1, max_size=4).map("/".join)
# Mostly good buckets, so that the rest of a value gets checked too.
bucket = st.sampled_from(
    ["bucket", "bucket", "bucket", "my-bucket", "b.c", "b", "B", "a..b", "xn--b", "1.2.3.4"]
)
s3_src = st.builds(
    lambda b, key, prefix: f"s3://{b}/{key}{'/' if prefix else ''}",
    bucket,
    rel_path | st.just(""),
    st.booleans(),
)
path_src = st.builds(lambda p, slash: f"/{p}{'/' if slash else ''}", rel_path, st.booleans())
stage_in_value = st.builds(
    lambda src, dest: src if dest is None else f"{src}:{dest}",
    s3_src | path_src,
    st.none()
    | rel_path
    | rel_path.map(lambda p: p + "/")
    | st.just("/")
    | rel_path.map(lambda p: "/" + p),
)
flags = st.sampled_from(
    ["", ":on=success", ":on=failure,optional", ":optional", ":on=never", ":optional,optional"]
)
stage_out_value = st.builds(
    lambda src, dest, flag: f"{src}:{dest}{flag}", rel_path | st.just("."), s3_src, flags
)
near_valid = st.tuples(st.just("stage-in"), stage_in_value) | st.tuples(
    st.just("stage-out"), stage_out_value
)
kinds = st.sampled_from(["stage-in", "stage-out"])
any_value = st.tuples(kinds, values) | near_valid


# --- what an accepted directive may name ------------------------------------------------------


def check_refusal(err: DirectiveError, line: int) -> None:
    message = str(err)
    assert message.startswith(f"line {line}: "), message[:200]
    assert len(message) < SHORT, (len(message), message[:200])
    assert not UNSAFE.search(message), ascii(message[:200])


def check_text(text: str) -> None:
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in text), ascii(text)


def check_bucket_and_key(bucket_name: str, key: str, kind: SourceKind) -> None:
    assert BUCKET.fullmatch(bucket_name) and ".." not in bucket_name, bucket_name
    assert len(key.encode()) <= MAX_KEY_BYTES
    check_text(key)
    if key:
        assert all(part not in ("", ".", "..") for part in key.removesuffix("/").split("/"))
    assert (kind is SourceKind.S3_PREFIX) == (key == "" or key.endswith("/"))


def check_inside(rel: PurePosixPath, allow_dot: bool = False, made: bool = True) -> None:
    """``rel`` is exactly a normal relative path: joining it to $HPCSTAGE_DIR leaves nothing
    to fold (so no two spellings land on one file) and nothing outside. ``made``: a path
    hpcstage creates, so each name fits NAME_MAX (a shared SRC path is only read: one with a
    longer name does not exist)."""
    text = str(rel)
    if allow_dot and text == ".":
        return
    assert not rel.is_absolute() and "\x00" not in text, ascii(text)
    assert all(part not in ("", ".", "..") for part in text.split("/")), ascii(text)
    if made:
        assert all(len(part.encode()) <= MAX_NAME_BYTES for part in text.split("/")), ascii(text)
    assert posixpath.normpath(posixpath.join("/stage", text)) == f"/stage/{text}"
    check_text(text)


def check_accepted(directive: StageIn | StageOut) -> None:
    if isinstance(directive, StageIn):
        src = directive.src
        if src.kind is SourceKind.PATH:
            assert src.path.startswith("/") and src.path != "/"
            check_inside(PurePosixPath(src.path[1:]), made=False)
        else:
            check_bucket_and_key(src.bucket, src.key, src.kind)
        check_inside(directive.dest)
    else:
        check_inside(directive.src, allow_dot=True)
        check_bucket_and_key(directive.dest.bucket, directive.dest.key, directive.dest.kind)


# --- (a) one value: accepted within the grammar, or refused by line, briefly ------------------


@FUZZ
@given(any_value, st.integers(0, 10**6))
@example(("stage-in", "s3://bucket/k:" + "a/" * 1900 + ".."), 7)  # echoed whole: 4 KiB
@example(("stage-out", "x:s3://bucket/o/:" + "z" * 3000), 0)
@example(("stage-in", "gs" * 1000 + "://x"), 0)
@example(("stage-in", "s3://" + "b" * 3000 + "/k"), 0)
@example(("stage-out", "x:s3://bucket/%" + "9" * 3000 + "j"), 0)
def test_a_value_is_accepted_within_the_grammar_or_refused_by_line(
    kind_value: tuple[str, str], line: int
) -> None:
    kind, value = kind_value
    try:
        directive = parse_value(kind, value, line)  # type: ignore[call-overload]
    except DirectiveError as err:
        check_refusal(err, line)
        return
    check_accepted(directive)
    assert directive.text == f"--{kind}={value}" and directive.line == line


@FUZZ
@given(
    st.lists(any_value, max_size=6), st.lists(st.sampled_from(["", "srun x", "# c"]), max_size=3)
)
def test_every_refusal_in_a_script_names_a_directive_line(
    items: list[tuple[str, str]], filler: list[str]
) -> None:
    body = [f"#HPCSTAGE --{kind}={value}" for kind, value in items]
    script = "\n".join(["#!/bin/bash", *filler[:1], *body, *filler[1:]])
    parsed = parse_script(script)
    lines = script.split("\n")
    for problem in (*parsed.errors, *parsed.warnings):
        assert lines[problem.line - 1].startswith("#HPCSTAGE"), problem.line
        assert len(str(problem)) < SHORT and not UNSAFE.search(str(problem)), ascii(
            str(problem)[:200]
        )
    for directive in (*parsed.stage_in, *parsed.stage_out):
        check_accepted(directive)
    if parsed.errors:
        with pytest.raises(DirectiveError) as info:
            parsed.raise_if_errors()
        assert len(str(info.value)) < SHORT * 5 and not UNSAFE.search(str(info.value))


# Job names and user names are the user's: anything may come out of %x.
job_name = st.text(max_size=40) | st.sampled_from(
    ["..", ".", "/", "a/../../b", "x/", "", "\x00", "a" * 2000]
)


@FUZZ
@given(stage_out_value, job_name, st.integers(0, 2**32))
def test_an_expanded_stage_out_stays_a_valid_key_of_the_same_kind(
    value: str, name_: str, job_id: int
) -> None:
    try:
        stage_out = parse_value("stage-out", value, 3)
    except DirectiveError:
        return
    context = JobContext(job_id=job_id, user="alice", name=name_)
    try:
        expanded = expand_stage_out(stage_out, context)
    except DirectiveError as err:
        check_refusal(err, 3)
        return
    dest = expanded.dest
    check_bucket_and_key(dest.bucket, dest.key, dest.kind)
    assert dest.kind is stage_out.dest.kind and dest.bucket == stage_out.dest.bucket


# --- (a) byte-exact travel: script quoting, admin_comment -------------------------------------


def _same(a: StageIn | StageOut, b: StageIn | StageOut) -> bool:
    if isinstance(a, StageIn) and isinstance(b, StageIn):
        return (a.src, a.dest) == (b.src, b.dest)
    if isinstance(a, StageOut) and isinstance(b, StageOut):
        return (a.src, a.dest, a.when, a.optional) == (b.src, b.dest, b.when, b.optional)
    return False


def _directives(parsed: ParsedDirectives) -> list[StageIn | StageOut]:
    return [*parsed.stage_in, *parsed.stage_out]


@FUZZ
@given(near_valid | st.tuples(kinds, values))
def test_an_accepted_directive_crosses_the_admin_comment_byte_exact(
    kind_value: tuple[str, str],
) -> None:
    kind, value = kind_value
    try:
        directive = parse_value(kind, value)  # type: ignore[call-overload]
    except DirectiveError:
        return
    comment = encode_admin_comment([directive.text])
    assert comment.isascii() and not re.search(r"[\s;]", comment.removesuffix(";end"))
    decoded = decode_admin_comment(f"site note {comment}")
    assert decoded == [directive.text]  # the very characters, Unicode form and all
    [again] = _directives(parse_args(decoded))
    assert again == directive


def _escaped(word: str) -> str:
    return re.sub(r"""([\s'"\\#])""", r"\\\1", word)


QUOTINGS = {
    "backslashes": _escaped,
    "single quotes": lambda w: f"'{w}'" if "'" not in w else None,
    "double quotes": lambda w: f'"{w}"' if '"' not in w else None,
    "separate word": lambda w: "{} {}".format(w.split("=", 1)[0], _escaped(w.split("=", 1)[1])),
}


@FUZZ
@given(near_valid, st.sampled_from(sorted(QUOTINGS)), st.sampled_from(["", "  # a comment", "\t"]))
def test_an_accepted_value_written_on_a_hpcstage_line_reads_back_byte_exact(
    kind_value: tuple[str, str], quoting: str, tail: str
) -> None:
    kind, value = kind_value
    try:
        directive = parse_value(kind, value)  # type: ignore[call-overload]
    except DirectiveError:
        return
    word = f"--{kind}={value}"
    written = QUOTINGS[quoting](word)
    if written is None:
        return
    parsed = parse_script(f"#!/bin/bash\n#HPCSTAGE {written}{tail}\nsrun true\n")
    assert parsed.errors == (), [str(e) for e in parsed.errors]
    [again] = _directives(parsed)
    assert _same(again, directive), (written, again, directive)


# --- (a) job_submit.lua and the daemon agree ---------------------------------------------------

LUA = shutil.which("lua5.1")
JOB_SUBMIT = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "job_submit.lua"
# Reads the scripts from stdin, separated by a NUL byte (no script holds one: sbatch stops
# reading at it), and prints each admin_comment on a line of its own.
DRIVER = """
slurm = {SUCCESS = 0, ERROR = -1}
function slurm.log_debug() end
function slurm.log_info() end
function slurm.log_user() end
dofile(arg[1])
local all = io.read("*a")
for script in all:gmatch("([^%z]*)%z") do
  local job = {script = script}
  assert(slurm_job_submit(job, {}, 1000) == slurm.SUCCESS)
  io.write((job.admin_comment or ""), "\\n")
end
"""


def lua_comments(scripts: list[str]) -> list[str]:
    assert LUA is not None
    done = subprocess.run(
        [LUA, "-e", DRIVER.replace("arg[1]", repr(str(JOB_SUBMIT)))],
        input="".join(f"{s}\x00" for s in scripts).encode(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split("\n")[:-1]


def via_lua(comment: str) -> tuple[bool, list[StageIn | StageOut]]:
    """(refused, directives) as the daemon sees a job through job_submit.lua's admin_comment."""
    try:
        decoded = decode_admin_comment(comment)
    except DirectiveError:
        return True, []
    parsed = parse_args(decoded or [])
    return bool(parsed.errors), _directives(parsed)


def via_script(script: str) -> tuple[bool, list[StageIn | StageOut]]:
    parsed = parse_script(script)
    return bool(parsed.errors), _directives(parsed)


def agree(script: str, comment: str) -> None:
    lua_refused, lua_found = via_lua(comment)
    refused, found = via_script(script)
    assert lua_refused == refused, (script, comment)
    if not refused:  # a refused job runs with nothing: what else was found does not matter
        assert len(lua_found) == len(found), (script, comment)
        assert all(_same(a, b) for a, b in zip(lua_found, found, strict=True)), (script, comment)


# #HPCSTAGE lines as people (and attackers) write them. No NUL (the driver's separator; sbatch
# ends the script there) and no lone surrogates (a script is bytes; Lua sees UTF-8).
word = st.one_of(
    st.builds(
        lambda kv, q: QUOTINGS[q](f"--{kv[0]}={kv[1]}") or "",
        near_valid,
        st.sampled_from(sorted(QUOTINGS)),
    ),
    st.builds(lambda kv: f"--{kv[0]}={kv[1]}", near_valid),
    st.builds(lambda k, v: f"--{k} {v}", kinds, st.sampled_from(["s3://b/k/", "'s3://b/a b'", ""])),
    st.sampled_from(
        ["--stage_in=s3://bucket/x", "--stagein", "-N", "#", "# c", "'", '"', "\\", "\\#"]
    ),
    st.lists(st.sampled_from([p for p in PIECES if p not in ("\x00", "\udcff")]), max_size=8).map(
        "".join
    ),
)
hpcstage_line = st.builds(
    lambda sep, words: "#HPCSTAGE" + sep + " ".join(words),
    st.sampled_from([" ", "  ", "\t", ""]),
    st.lists(word, min_size=1, max_size=3),
)
other_line = st.sampled_from(
    ["", "   ", "# note", "  # indented", "#SBATCH -N 1", "srun true", "\r"]
)
script_text = st.lists(hpcstage_line | other_line, min_size=1, max_size=6).map(
    lambda lines: "#!/bin/bash\n" + "\n".join(lines) + "\n"
)

needs_lua = pytest.mark.skipif(LUA is None, reason="lua5.1 is not installed (scripts/bootstrap)")


@needs_lua
@settings(FUZZ, max_examples=50)
@given(st.lists(script_text, min_size=1, max_size=20))
def test_job_submit_lua_and_the_daemon_read_a_script_alike(scripts: list[str]) -> None:
    # 50 batches of 20 scripts: one lua5.1 process per batch keeps this at about a second.
    for script, comment in zip(scripts, lua_comments(scripts), strict=True):
        agree(script, comment)
