"""Staging directives: grammar, refusals naming the line, patterns, admin_comment encoding."""

from __future__ import annotations

import posixpath
import re
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcstage.core import directives as dirs
from hpcstage.core.directives import (
    MAX_DIRECTIVES,
    NO_VAL,
    JobContext,
    Source,
    SourceKind,
    StageIn,
    StageOut,
    When,
    decode_admin_comment,
    encode_admin_comment,
    expand_patterns,
    expand_stage_out,
    parse_args,
    parse_script,
    parse_source,
    parse_value,
)
from hpcstage.errors import DirectiveError

OBJ, PREFIX, PATH = SourceKind.S3_OBJECT, SourceKind.S3_PREFIX, SourceKind.PATH
ALWAYS, SUCCESS, FAILURE = When.ALWAYS, When.SUCCESS, When.FAILURE

# --- stage-in grammar -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "src", "dest"),
    [
        ("s3://bucket/data/in.csv", Source(OBJ, "bucket", "data/in.csv"), "in.csv"),
        (
            "s3://bucket/data/in.csv:inputs/a.csv",
            Source(OBJ, "bucket", "data/in.csv"),
            "inputs/a.csv",
        ),
        ("s3://bucket/ref/genome/", Source(PREFIX, "bucket", "ref/genome/"), "genome"),
        ("s3://bucket/ref/genome/:g", Source(PREFIX, "bucket", "ref/genome/"), "g"),
        ("s3://my.bucket-1/", Source(PREFIX, "my.bucket-1", ""), "my.bucket-1"),
        ("S3://bucket/k", Source(OBJ, "bucket", "k"), "k"),  # schemes are case-insensitive
        ("/shared/data/set1", Source(PATH, path="/shared/data/set1"), "set1"),
        ("/shared/data/set1/:sets/one", Source(PATH, path="/shared/data/set1"), "sets/one"),
        ("s3://bucket/k:name:with:colons", Source(OBJ, "bucket", "k"), "name:with:colons"),
        ("s3://bucket/dir/ü space.txt", Source(OBJ, "bucket", "dir/ü space.txt"), "ü space.txt"),
        # "DIR/" means "into DIR", as with cp.
        ("s3://bucket/pre/:inputs/", Source(PREFIX, "bucket", "pre/"), "inputs"),
        ("s3://bucket/d/in.csv:inputs/", Source(OBJ, "bucket", "d/in.csv"), "inputs/in.csv"),
        # A path may be a file: written without a final '/' it goes into DIR by its name
        # (cp -r /shared/a.pdb inputs/), with one its contents land as DIR (like a prefix).
        ("/shared/a.pdb:inputs/", Source(PATH, path="/shared/a.pdb"), "inputs/a.pdb"),
        ("/shared/set:inputs/", Source(PATH, path="/shared/set"), "inputs/set"),
        ("/shared/set/:inputs/", Source(PATH, path="/shared/set"), "inputs"),
    ],
)
def test_good_stage_in(value: str, src: Source, dest: str) -> None:
    parsed = parse_value("stage-in", value)
    assert parsed == StageIn(src, PurePosixPath(dest), 0, f"--stage-in={value}")
    assert parse_source(parsed.src.url) == src


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "needs a value"),
        ("relative/path", "SRC must be s3://BUCKET/KEY"),
        ("data.csv:x", "SRC must be s3://BUCKET/KEY"),
        ("gs://bucket/key", "unsupported scheme gs://"),
        ("http://host/key", "unsupported scheme http://"),
        ("s3://bucket", "needs /KEY"),
        ("s3://Bucket/key", "not a valid S3 bucket name"),
        ("s3://ab/key", "not a valid S3 bucket name"),
        ("s3://a..b/key", "not a valid S3 bucket name"),
        ("s3://192.168.1.1/key", "not a valid S3 bucket name"),
        ("s3://xn--bucket/key", "not a valid S3 bucket name"),
        ("s3://b_ucket/key", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "has a '..' component"),
        ("s3://bucket/../b", "has a '..' component"),
        ("s3://bucket/a/./b", "has a '.' component"),
        ("s3://bucket/a//b", "has an empty component"),
        ("s3://bucket//a", "has an empty component"),
        ("s3://bucket/k:../escape", "has a '..' component"),
        ("s3://bucket/k:a/../../escape", "has a '..' component"),
        ("s3://bucket/k:/etc/passwd", "must be relative"),
        ("s3://bucket/k:", "DEST is empty"),
        ("s3://bucket/k:dir//", "must not end with '/'"),
        ("s3://bucket/k:a//b", "has an empty component"),
        ("s3://bucket/k:.", "has a '.' component"),
        ("s3://bucket/" + "k" * 1025, "longer than 1024 bytes"),
        ("s3://bucket/" + "é" * 513, "longer than 1024 bytes"),
        ("s3://bucket/" + "k" * 300, "over 255 bytes"),
        ("s3://bucket/k:x\x00y", "control character"),
        ("s3://bucket/k\x1b[31m", "control character"),
        ("s3://bucket/k\udcff", "control character"),
        ("/shared/" + "a/" * 2100, "longer than 4096 characters"),
        ("/", "root directory"),
        ("/shared/../etc", "has a '..' component"),
        ("/shared//x", "has an empty component"),
    ],
)
def test_bad_stage_in(value: str, message: str) -> None:
    with pytest.raises(DirectiveError, match="line 0: .*" + re.escape(message)):
        parse_value("stage-in", value)


# --- stage-out grammar ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "src", "dest", "when", "optional"),
    [
        ("res:s3://bucket/out/%j/", "res", Source(PREFIX, "bucket", "out/%j/"), ALWAYS, False),
        ("a/b:s3://bucket/%u/%x_%A_%a", "a/b", Source(OBJ, "bucket", "%u/%x_%A_%a"), ALWAYS, False),
        (".:s3://bucket/all/", ".", Source(PREFIX, "bucket", "all/"), ALWAYS, False),
        ("r:s3://bucket/o/:on=success", "r", Source(PREFIX, "bucket", "o/"), SUCCESS, False),
        (
            "r:s3://bucket/o/:on=failure,optional",
            "r",
            Source(PREFIX, "bucket", "o/"),
            FAILURE,
            True,
        ),
        ("r:s3://bucket/o/:optional", "r", Source(PREFIX, "bucket", "o/"), ALWAYS, True),
        ("r:s3://bucket/100%%/", "r", Source(PREFIX, "bucket", "100%%/"), ALWAYS, False),
    ],
)
def test_good_stage_out(value: str, src: str, dest: Source, when: When, optional: bool) -> None:
    parsed = parse_value("stage-out", value, line=3)
    assert parsed == StageOut(PurePosixPath(src), dest, when, optional, 3, f"--stage-out={value}")
    assert parsed.dest_url == dest.url


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("results", "needs SRC:DEST"),
        (":s3://bucket/o/", "SRC is empty"),
        ("/abs:s3://bucket/o/", "must be relative"),
        ("../up:s3://bucket/o/", "has a '..' component"),
        ("a/../../b:s3://bucket/o/", "has a '..' component"),
        ("./a:s3://bucket/o/", "has a '.' component"),
        ("r:/shared/out", "must be s3://BUCKET/PREFIX/"),
        ("r:gs://bucket/o/", "unsupported scheme gs://"),
        ("r:s3://bucket/o/../x/", "has a '..' component"),
        ("r:s3://Bad_Bucket/o/", "not a valid S3 bucket name"),
        ("r:s3://bucket/o/%Q/", "unsupported pattern %Q"),
        ("r:s3://bucket/o/%", "unsupported pattern a trailing '%'"),
        ("r:s3://bucket/o/%123j", "pattern width"),
        ("r:s3://bucket/o/:", "unknown stage-out flag ''"),
        ("r:s3://bucket/o/:on=maybe", "unknown stage-out flag 'on=maybe'"),
        ("r:s3://bucket/o/:sync", "unknown stage-out flag 'sync'"),
        ("r:s3://bucket/o/:optional=yes", "unknown stage-out flag"),
        ("r:s3://bucket/o/:on=success,on=failure", "given twice"),
    ],
)
def test_bad_stage_out(value: str, message: str) -> None:
    with pytest.raises(DirectiveError, match=re.escape(message)):
        parse_value("stage-out", value, line=12)
    with pytest.raises(DirectiveError, match=r"^line 12: "):
        parse_value("stage-out", value, line=12)


@pytest.mark.parametrize(
    ("value", "key", "when", "optional"),
    [
        ("out:s3://bucket/out/run-%j.hpack/:pack", "out/run-%j.hpack/", ALWAYS, False),
        ("out:s3://bucket/run.hpack:pack", "run.hpack/", ALWAYS, False),  # the '/' is implied
        ("out:s3://bucket/r.hpack/:on=success,pack,optional", "r.hpack/", SUCCESS, True),
        (".:s3://bucket/a/b/%u.hpack/:pack", "a/b/%u.hpack/", ALWAYS, False),
    ],
)
def test_packed_stage_out(value: str, key: str, when: When, optional: bool) -> None:
    parsed = parse_value("stage-out", value, line=4)
    assert parsed.pack
    assert (parsed.dest, parsed.when, parsed.optional) == (
        Source(PREFIX, "bucket", key),
        when,
        optional,
    )
    assert not parse_value("stage-out", "out:s3://bucket/o/").pack


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # No loose objects into a dataset by mistake: the flag is needed.
        ("out:s3://bucket/run.hpack/", "add the flag ':pack'"),
        ("out:s3://bucket/run.hpack/sub/", "add the flag ':pack'"),
        ("out:s3://bucket/run.hpack@2/x", "add the flag ':pack'"),
        ("out:s3://bucket/ds.hpack/f.txt:on=success", "add the flag ':pack'"),
        # With it, DEST is the dataset itself, unpinned.
        ("out:s3://bucket/run.hpack@3/:pack", "cannot pin @3"),
        ("out:s3://bucket/run.hpack/sub/:pack", "the dataset itself"),
        ("out:s3://bucket/run.hpack/f.txt:pack", "the dataset itself"),
        ("out:s3://bucket/out/:pack", "names a packed dataset"),
        ("out:s3://bucket/run.tar:pack", "names a packed dataset"),
        ("out:s3://bucket/run.hpack/:pack=yes", "unknown stage-out flag 'pack=yes'"),
        ("out:s3://bucket/run.hpack/:pack,pack", "given twice"),
        ("out:s3://bucket/run.hpack@x/:pack", "a pinned version is @ and a number"),
    ],
)
def test_bad_packed_stage_out(value: str, message: str) -> None:
    with pytest.raises(DirectiveError, match=r"^line 9: .*" + re.escape(message)):
        parse_value("stage-out", value, line=9)


def test_expanded_job_name_cannot_move_a_stage_out_into_or_out_of_a_dataset() -> None:
    loose = parse_value("stage-out", "r:s3://results/%x/", line=5)
    with pytest.raises(DirectiveError, match=r"^line 5: .*add the flag ':pack'"):
        expand_stage_out(loose, JobContext(1, "alice", "evil.hpack"))
    packed = parse_value("stage-out", "r:s3://results/%x.hpack/:pack", line=6)
    expanded = expand_stage_out(packed, JobContext(7, "alice", "run"))
    assert (expanded.dest.key, expanded.pack) == ("run.hpack/", True)
    with pytest.raises(DirectiveError, match=r"^line 6: .*the dataset itself"):
        expand_stage_out(packed, JobContext(1, "alice", "a.hpack/b"))


# --- scripts ------------------------------------------------------------------------------

SCRIPT = """#!/bin/bash
#SBATCH --job-name=dock -N 1 --stage-in=s3://datasets/ligands/ --time=10
#SBATCH --stage-in "s3://datasets/receptor 1.pdb:receptor.pdb"   # a comment --stage-in=x
  # indented comments and blank lines keep the header open

#HPCSTAGE --stage-in=/shared/ref/params
#HPCSTAGE --stage-out=results:s3://results/%u/%j/:on=success
#SBATCH --stage-out out.log:s3://results/%u/%j/log.txt
#SLURM --stage-in=s3://datasets/legacy-magic-word:legacy
module load gromacs
#SBATCH --stage-in=s3://datasets/too/late
"""


def test_script_directives_in_order() -> None:
    parsed = parse_script(SCRIPT)
    assert parsed.errors == ()
    assert [(d.line, d.src.url, str(d.dest)) for d in parsed.stage_in] == [
        (2, "s3://datasets/ligands/", "ligands"),
        (3, "s3://datasets/receptor 1.pdb", "receptor.pdb"),
        (6, "/shared/ref/params", "params"),
        (9, "s3://datasets/legacy-magic-word", "legacy"),
    ]
    assert [(d.line, str(d.src), d.dest_url, d.when) for d in parsed.stage_out] == [
        (7, "results", "s3://results/%u/%j/", When.SUCCESS),
        (8, "out.log", "s3://results/%u/%j/log.txt", When.ALWAYS),
    ]
    assert parsed.stage_in[0].text.startswith("#SBATCH --job-name=dock")
    assert [(w.line, w.message) for w in parsed.warnings] == [
        (11, "ignored: sbatch reads no directive after a command")
    ]


def test_script_collects_every_error_with_its_line() -> None:
    script = "\n".join(
        [
            "#!/bin/sh",
            "#SBATCH --stage-in=s3://bucket/a:../x",  # 2
            "#SBATCH --stage-in=gs://bucket/a",  # 3
            "#HPCSTAGE --stage-in=s3://bucket/ok",  # 4
            "#HPCSTAGE --stage-in=s3://other-bucket/ok",  # 5: same DEST as line 4
            "#HPCSTAGE --time=10",  # 6: not ours
            '#HPCSTAGE --stage-in="s3://bucket/unclosed',  # 7
            "#SBATCH --stage-out",  # 8
            "#SBATCH --stage-out=x:s3://bucket/%q",  # 9
            "srun true",
        ]
    )
    parsed = parse_script(script)
    assert [(e.line, e.message) for e in parsed.errors] == [
        (2, "DEST '../x' has a '..' component"),
        (3, "unsupported scheme gs:// (use s3:// or an absolute path)"),
        (5, "DEST 'ok' already used on line 4"),
        (6, "unknown #HPCSTAGE option '--time=10'"),
        (7, 'unmatched " quote'),
        (8, "--stage-out needs a value on the same line"),
        (9, "unsupported pattern %q (known: %j %u %x %A %a %n %N %%)"),
    ]
    assert [d.line for d in parsed.stage_in] == [4]
    assert str(parsed.errors[0]) == (
        "line 2: DEST '../x' has a '..' component: #SBATCH --stage-in=s3://bucket/a:../x"
    )
    with pytest.raises(DirectiveError, match=r"line 2: .*; line 3: .*; line 5: "):
        parsed.raise_if_errors()


def test_sbatch_word_splitting() -> None:
    script = (
        "#SBATCH --stage-in=s3://bucket/a\\ b --stage-in='s3://bucket/c d:e#f' "
        '--stage-in=s3://bucket/g"h i"#comment --stage-in=s3://bucket/never\r\n'
    )
    parsed = parse_script(script)
    assert [(d.src.key, str(d.dest)) for d in parsed.stage_in] == [
        ("a b", "a b"),
        ("c d", "e#f"),
        ("gh i", "gh i"),
    ]


def test_other_sbatch_options_are_ignored_and_empty_scripts_are_fine() -> None:
    assert parse_script("#SBATCH -N 2 --mem=4G --comment='x y'\necho\n").stage_in == ()
    assert parse_script("") == parse_script("echo only a command\n")
    assert parse_script("   \n#!/bin/sh\n#SBATCH --stage-in=/a/b\n").stage_in[0].line == 3


def test_directive_limit() -> None:
    lines = [f"#HPCSTAGE --stage-in=s3://bucket/k{i}" for i in range(MAX_DIRECTIVES + 5)]
    parsed = parse_script("\n".join(lines))
    assert len(parsed.stage_in) == MAX_DIRECTIVES
    assert [(e.line, e.message) for e in parsed.errors] == [
        (MAX_DIRECTIVES + 1, f"more than {MAX_DIRECTIVES} directives in one job")
    ]


# --- patterns -----------------------------------------------------------------------------

JOB = JobContext(job_id=4242, user="alice", name="dock")
ARRAY_TASK = JobContext(job_id=4250, user="alice", name="dock", array_job_id=4242, array_task_id=7)


@pytest.mark.parametrize(
    ("text", "context", "expected"),
    [
        ("%j", JOB, "4242"),
        ("%u/%x", JOB, "alice/dock"),
        ("%A_%a", ARRAY_TASK, "4242_7"),
        ("%A_%a", JOB, f"4242_{NO_VAL}"),  # as sbatch prints outside arrays
        ("%8j", JOB, "00004242"),
        ("%3a", ARRAY_TASK, "007"),
        ("100%%", JOB, "100%"),
        ("%%j", JOB, "%j"),
        ("no patterns", JOB, "no patterns"),
    ],
)
def test_expand_patterns(text: str, context: JobContext, expected: str) -> None:
    assert expand_patterns(text, context) == expected


@pytest.mark.parametrize("text", ["%Q", "%t", "%", "abc%", "%5%", "%99j"])
def test_expand_patterns_refuses_unknown(text: str) -> None:
    with pytest.raises(DirectiveError):
        expand_patterns(text, JOB)


def test_expand_stage_out_revalidates() -> None:
    stage_out = parse_value("stage-out", "r:s3://results/%u/%x/%j/", line=7)
    expanded = expand_stage_out(stage_out, JOB)
    assert expanded.dest == Source(PREFIX, "results", "alice/dock/4242/")
    assert expanded.line == 7
    assert stage_out.dest.key == "%u/%x/%j/"
    for name in ["..", "a/../..", "", "x\ny"]:
        with pytest.raises(DirectiveError, match=r"^line 7: "):
            expand_stage_out(stage_out, JobContext(1, "alice", name))
    as_object = parse_value("stage-out", "r:s3://results/%x")
    with pytest.raises(DirectiveError, match="changes from object to prefix"):
        expand_stage_out(as_object, JobContext(1, "alice", "dir/"))


# --- admin_comment ------------------------------------------------------------------------

DIRECTIVES = [
    "--stage-in=s3://datasets/a b;c%d/:x",
    "--stage-out=results:s3://results/%j/:on=success",
    "--stage-in=/shared/é",
]


def test_admin_comment_round_trip_and_shape() -> None:
    comment = encode_admin_comment(DIRECTIVES)
    assert comment.startswith("hpcstage:v1:in=s3://datasets/a%20b%3Bc%25d/:x;")
    assert comment.endswith(";end")
    assert " " not in comment
    assert decode_admin_comment(comment) == DIRECTIVES
    assert decode_admin_comment(f"approved by ops\t{comment} ticket 42") == DIRECTIVES
    assert decode_admin_comment(encode_admin_comment([])) == []
    parsed = parse_args(decode_admin_comment(comment) or [])
    assert (len(parsed.stage_in), len(parsed.stage_out), parsed.errors) == (2, 1, ())


@pytest.mark.parametrize("text", ["", "just an admin note", "nothpcstage:v1:end", "hpcstage"])
def test_admin_comment_not_ours(text: str) -> None:
    assert decode_admin_comment(text) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hpcstage:v2:in=x;end", "format v2"),
        ("hpcstage:v1:in=s3://b/k", "truncated"),
        ("hpcstage:v1:in=s3://b/k;e", "truncated"),
        ("hpcstage:v1:inx=s3://b/k;end", "malformed"),
        ("hpcstage:v1:in=a%2;end", "malformed"),
        ("hpcstage:v1:in=a%FF;end", "not UTF-8"),
        ("hpcstage:v1:end hpcstage:v1:end", "more than one"),
    ],
)
def test_admin_comment_ours_but_broken(text: str, message: str) -> None:
    with pytest.raises(DirectiveError, match=message):
        decode_admin_comment(text)


def test_admin_comment_refuses_non_directives() -> None:
    with pytest.raises(DirectiveError, match="not a staging directive"):
        encode_admin_comment(["--time=10"])
    with pytest.raises(DirectiveError, match="more than"):
        encode_admin_comment([f"--stage-in=s3://bucket/{'k' * 1000}/{i}" for i in range(40)])
    assert parse_args(["--stage-in"]).errors[0].message.startswith("expected --stage-in=VALUE")


directive_values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=60
)


@given(st.lists(st.tuples(st.sampled_from(["in", "out"]), directive_values), max_size=5))
def test_admin_comment_round_trips(items: list[tuple[str, str]]) -> None:
    directives = [f"--stage-{kind}={value}" for kind, value in items]
    comment = encode_admin_comment(directives)
    assert decode_admin_comment(f"note {comment}\n") == directives


# --- properties -----------------------------------------------------------------------------

pieces = st.sampled_from(
    ["s3://", "bucket", "my-bucket", "/", ":", "..", ".", "%j", "%", "a", "é", " ", "\x00",
     "\t", "'", '"', "\\", "#", "--stage-in=", "--stage-out=", "on=success", ",", "\n",
     "#SBATCH ", "#HPCSTAGE ", "gs://", "\udcff", "~"]
)  # fmt: skip
directive_text = st.lists(pieces | st.text(max_size=4), max_size=14).map("".join)
# Near-valid directives, so that many examples parse and have their DEST checked.
segments = st.lists(st.sampled_from(["a", "..", ".", "", "é b", "%j", "x:y"]), max_size=4)
near_valid = st.builds(
    lambda magic, src, dest: f"{magic} --stage-in={src}:{'/'.join(dest)}",
    st.sampled_from(["#SBATCH", "#HPCSTAGE"]),
    st.sampled_from(["s3://bucket/k", "s3://bucket/p/", "/shared/x"]),
    segments,
)


def _inside_stage_dir(parsed_dests: list[PurePosixPath]) -> bool:
    joined = [posixpath.normpath(posixpath.join("/stage", str(dest))) for dest in parsed_dests]
    return all(path.startswith("/stage/") for path in joined)


@given(directive_text)
def test_parse_value_never_escapes(value: str) -> None:
    for kind in ("stage-in", "stage-out"):
        try:
            parsed = parse_value(kind, value)
        except DirectiveError:
            continue
        if isinstance(parsed, StageIn):
            assert _inside_stage_dir([parsed.dest])
        else:
            src = posixpath.normpath(posixpath.join("/stage", str(parsed.src)))
            assert src == "/stage" or src.startswith("/stage/")


@given(st.lists(directive_text | near_valid, max_size=8).map("\n".join))
def test_parse_script_never_raises_or_escapes(script: str) -> None:
    parsed = parse_script(script)
    assert _inside_stage_dir([d.dest for d in parsed.stage_in])
    for problem in parsed.errors:
        assert problem.line >= 1
        assert problem.message


@pytest.mark.parametrize(
    ("value", "key", "dest", "policy_url"),
    [
        ("s3://data-bucket/lib/ligands.hpack/", "lib/ligands.hpack/", "ligands", ""),
        ("s3://data-bucket/lib/ligands.hpack", "lib/ligands.hpack/", "ligands", ""),
        (
            "s3://data-bucket/lib/ligands.hpack@3/set1/",
            "lib/ligands.hpack@3/set1/",
            "set1",
            "set1/",
        ),
        (
            "s3://data-bucket/lib/ligands.hpack@3/set1/:in/",
            "lib/ligands.hpack@3/set1/",
            "in",
            "set1/",
        ),
        ("s3://data-bucket/lib/ligands.hpack/a/b:x", "lib/ligands.hpack/a/b/", "x", "a/b/"),
    ],
)
def test_a_packed_dataset_is_recognised_with_its_version_and_subtree(
    value: str, key: str, dest: str, policy_url: str
) -> None:
    stage_in = parse_value("stage-in", value)
    assert isinstance(stage_in, StageIn)
    assert (stage_in.src.kind, stage_in.src.key, str(stage_in.dest)) == (
        SourceKind.S3_PACKED,
        key,
        dest,
    )
    # The policy judges the dataset (and subtree), never the version: a grant on the dataset
    # covers every version of it.
    assert stage_in.src.policy_url == f"s3://data-bucket/lib/ligands.hpack/{policy_url}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("s3://data-bucket/lib/l.hpack@x/", "a pinned version is @ and a number"),
        ("s3://data-bucket/lib/l.hpack@0/", "a version is a number from 1"),
        ("s3://data-bucket/lib/l.hpack/../etc/", "'..'"),
    ],
)
def test_bad_packed_sources_are_refused_by_name(value: str, message: str) -> None:
    with pytest.raises(DirectiveError, match=re.escape(message)):
        parse_value("stage-in", value)


def test_node_patterns_wait_for_the_node_and_then_name_it() -> None:
    out = dirs.parse_value("stage-out", "results:s3://bucket/run/%j/%N/part-%2n/")
    at_admission = dirs.expand_stage_out(out, dirs.JobContext(job_id=7, user="u", name="x"))
    assert at_admission.dest.url == "s3://bucket/run/7/%N/part-%2n/"
    assert dirs.names_node(out.dest.url) and not dirs.names_node("s3://bucket/%%N/")
    on_n2 = dirs.JobContext(job_id=7, user="u", name="x", node="n2", node_index=1)
    assert dirs.expand_dest_template(out.dest.url, False, on_n2) == "s3://bucket/run/7/n2/part-01/"
