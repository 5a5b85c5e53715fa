"""Include/exclude filters on a stage-in prefix and pinned object versions: the glob
semantics (hpcstage.core.filters), the directive grammar that carries them, and the stored
source URL that brings them to the agent."""

from __future__ import annotations

import fnmatch
import time
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcstage.core.directives import (
    Source,
    SourceKind,
    decode_admin_comment,
    encode_admin_comment,
    location,
    parse_args,
    parse_script,
    parse_source,
    parse_value,
    policy_url,
)
from hpcstage.core.filters import KeyFilter, checked_filter
from hpcstage.core.identity import ObjectRef
from hpcstage.errors import DirectiveError
from hpcstage.protocol.messages import SourceSpec

# --- globs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "takes", "leaves"),
    [
        ("*.nc", ["a.nc", ".nc"], ["d/a.nc", "a.nc.tmp", "a.h5"]),
        ("**/*.nc", ["a.nc", "d/a.nc", "d/e/f/a.nc"], ["a.h5", "d/a.nc/x"]),
        ("2024/**", ["2024/a", "2024/b/c"], ["2025/a", "2024"]),
        ("a/**/b", ["a/b", "a/x/b", "a/x/y/b"], ["a/xb", "b", "a/b/c"]),
        ("**", ["a", "a/b/c"], []),
        ("run?/out", ["run1/out"], ["run/out", "run12/out", "run//out"]),
        ("[ab]*", ["a", "bcd"], ["c", "/a"]),
        ("[!ab].txt", ["c.txt"], ["a.txt", "/.txt"]),
        ("x[0-9]", ["x5"], ["xa", "x/"]),
        ("[]]", ["]"], ["a"]),
        ("[*]", ["*"], ["a"]),
        ("a+b(c).{d}$", ["a+b(c).{d}$"], ["aab(c).{d}"]),
        ("dir:1,2", ["dir:1,2"], ["dir:12"]),
    ],
)
def test_glob_semantics(glob: str, takes: list[str], leaves: list[str]) -> None:
    only = checked_filter((glob,), ())
    assert [k for k in takes if only.takes(k)] == takes
    assert [k for k in leaves if only.takes(k)] == []


def _reference(parts: list[str], keys: list[str]) -> bool:
    """The glob semantics written plainly: '**' any number of components (at the end, at
    least one: 'a/**' is what lies under a/), every other component matched by fnmatch
    within one key component."""
    if not parts:
        return not keys
    if parts == ["**"]:
        return bool(keys)
    if parts[0] == "**":
        return any(_reference(parts[1:], keys[i:]) for i in range(len(keys) + 1))
    return bool(keys) and fnmatch.fnmatchcase(keys[0], parts[0]) and _reference(parts[1:], keys[1:])


_COMPONENT = st.lists(st.sampled_from(["a", "b", "*", "?", "[ab]", "[!a]"]), min_size=1, max_size=5)
_GLOB = st.lists(st.one_of(st.just("**"), _COMPONENT.map("".join)), min_size=1, max_size=4)
_KEY = st.lists(st.text("ab", min_size=1, max_size=6), min_size=1, max_size=5)


@given(_GLOB, _KEY)
def test_globs_match_as_the_plain_reference_does(parts: list[str], keys: list[str]) -> None:
    glob = "/".join(parts)
    if any("**" in p and p != "**" for p in parts):
        return  # refused (e.g. '*' and '*' side by side): covered below
    assert checked_filter((glob,), ()).takes("/".join(keys)) == _reference(parts, keys), glob


def test_hostile_globs_do_not_backtrack_for_ever() -> None:
    """Nested wildcards against a long key take microseconds, not hours (a naive regex takes
    a minute for 40 characters here)."""
    start = time.monotonic()
    assert not checked_filter(("*a*a*a*a*a*a*a*a*a*a*b",), ()).takes("a" * 1000)
    deep = "/".join(["a"] * 400) + "/y"
    assert not checked_filter(("/".join(["**"] * 8 + ["x"]),), ()).takes(deep)
    assert not checked_filter(("/".join(["**", "a"] * 8 + ["x"]),), ()).takes(deep)
    assert time.monotonic() - start < 5  # a bound, not a speed: the naive form never ends


def test_exclude_wins_and_no_include_takes_everything() -> None:
    both = KeyFilter(include=("**/*.nc",), exclude=("tmp/**", "**/*-partial.nc"))
    assert both.takes("a.nc") and both.takes("d/a.nc")
    assert not both.takes("tmp/a.nc") and not both.takes("d/a-partial.nc")
    assert not both.takes("a.txt")
    only_exclude = KeyFilter(exclude=("*.tmp",))
    assert only_exclude.takes("a.nc") and only_exclude.takes("d/x.tmp")
    assert not only_exclude.takes("x.tmp")
    assert KeyFilter().takes("anything/at/all") and not KeyFilter()


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("", "empty"),
        ("/abs", "starts with '/'"),
        ("a[b", "no closing ']'"),
        ("[!", "no closing ']'"),
        ("a**", "whole path component"),
        ("**x/a", "whole path component"),
        ("a//b", "empty component"),
        ("[z-a]", "not a valid glob"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_bad_globs_are_refused_naming_them(glob: str, message: str) -> None:
    with pytest.raises(DirectiveError, match="exclude=") as err:
        checked_filter(("ok",), (glob,))
    assert message in str(err.value)


def test_glob_count_is_bounded() -> None:
    with pytest.raises(DirectiveError, match="more than 100"):
        checked_filter(tuple(f"{i}" for i in range(60)), tuple(f"x{i}" for i in range(41)))


# --- the directive grammar ------------------------------------------------------------------

FILTERED = KeyFilter(include=("*.nc", "**/*.h5"), exclude=("tmp/**",))


@pytest.mark.parametrize(
    ("value", "dest", "key_filter"),
    [
        ("s3://bk1/p/:in:include=*.nc,include=**/*.h5,exclude=tmp/**", "in", FILTERED),
        ("s3://bk1/p/::include=*.nc,include=**/*.h5,exclude=tmp/**", "p", FILTERED),
        ("s3://bk1/p/:in/:exclude=tmp/**", "in", KeyFilter(exclude=("tmp/**",))),
        # a glob may hold ',' and ':' (items split only before include=/exclude=)
        ("s3://bk1/p/:in:include=a,b:c", "in", KeyFilter(include=("a,b:c",))),
        # every form that worked before still does: a DEST may hold ':'
        ("s3://bk1/p/:a:b", "a:b", KeyFilter()),
        ("s3://bk1/p/:a:b:include=x", "a:b", KeyFilter(include=("x",))),
        # the stored form (Source.url) is a SRC too
        ("s3://bk1/p/?include=*.nc&exclude=tmp/**:in", "in", KeyFilter(("*.nc",), ("tmp/**",))),
    ],
)
def test_stage_in_filters(value: str, dest: str, key_filter: KeyFilter) -> None:
    got = parse_value("stage-in", value)
    assert got.src.kind is SourceKind.S3_PREFIX and got.src.key == "p/"
    assert got.dest == PurePosixPath(dest)
    assert got.src.filter == key_filter
    assert parse_source(got.src.url) == got.src  # what the daemon stores, the agent reads
    assert policy_url(got.src.url) == "s3://bk1/p/"  # the policy judges the prefix


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("s3://bk1/k:in:include=*.nc", "SRC 's3://bk1/k' is one object"),
        ("/shared/d/::include=*.nc", "is a path"),
        ("s3://bk1/lib/x.hpack/::include=*", "is a packed dataset"),
        ("s3://bk1/p/:include=*.nc", "write SRC::include=*.nc"),
        ("s3://bk1/p/::include=a[b", "include='a[b': '[' at character 2 has no closing"),
        ("s3://bk1/p/:d:exclude=", "exclude='': the glob is empty"),
        ("s3://bk1/p/::include=x**", "'**' must be a whole path component"),
    ],
)
def test_bad_stage_in_filters(value: str, message: str) -> None:
    with pytest.raises(DirectiveError, match="line 0") as err:
        parse_value("stage-in", value)
    assert message in str(err.value)


def test_a_bad_glob_in_a_script_names_its_line() -> None:
    script = "#!/bin/sh\n#HPCSTAGE --stage-in=s3://bk1/p/::include=[x\n#SBATCH -N1\necho\n"
    found = parse_script(script)
    assert not found.stage_in
    assert len(found.errors) == 1 and found.errors[0].line == 2
    assert "no closing ']'" in str(found.errors[0])


def test_filters_survive_the_admin_comment() -> None:
    value = "--stage-in=s3://bk1/p/:in:include=**/*.nc,exclude=a b/[!x]?%"
    comment = encode_admin_comment([value])
    assert " " not in comment
    (got,) = parse_args(decode_admin_comment(comment) or []).stage_in
    assert got.src.filter == KeyFilter(include=("**/*.nc",), exclude=("a b/[!x]?%",))


# --- pinned versions ------------------------------------------------------------------------


def test_a_pinned_version() -> None:
    got = parse_value("stage-in", "s3://bk1/d/k.bin?versionId=3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY:in")
    assert got.src == Source(
        SourceKind.S3_OBJECT, "bk1", "d/k.bin", version_id="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"
    )
    assert got.dest == PurePosixPath("in")
    assert parse_source(got.src.url) == got.src
    assert policy_url(got.src.url) == "s3://bk1/d/k.bin"
    spec = SourceSpec.of(got.src.url)
    assert spec.version_id == got.src.version_id and spec.url() == got.src.url


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("s3://bk1/p/?versionId=v1", "versionId pins one object; SRC 's3://bk1/p/' is a prefix"),
        ("s3://bk1/k?versionId=v1&versionId=v2", "more than one versionId"),
        ("s3://bk1/k?versionId=a%20b", "is not an S3 version id"),
        ("s3://bk1/k?versionId=", "is not an S3 version id"),
        ("s3://bk1/k?versionId=%FF", "is not UTF-8"),
        ("s3://bk1/p/?include=a%00b", "control character"),
    ],
)
def test_bad_versions(value: str, message: str) -> None:
    with pytest.raises(DirectiveError) as err:
        parse_value("stage-in", value)
    assert message in str(err.value)


def test_a_key_with_its_own_question_mark_is_still_a_key() -> None:
    assert parse_source("s3://bk1/what?.txt").key == "what?.txt"
    assert parse_source("s3://bk1/a?b=c").key == "a?b=c"  # no known query name: part of the key


def test_a_pinned_version_is_its_own_cache_entry() -> None:
    current = ObjectRef("s3", "b", "k", "e", 4)
    pinned = ObjectRef("s3", "b", "k", "e", 4, version_id="v1")
    assert pinned.cache_id != current.cache_id  # same ETag, still never served for the other
    # Unpinned objects keep the ids they had before versions existed (caches stay warm).
    assert current.cache_id == ObjectRef("s3", "b", "k", "e", 4, last_modified_ns=5).cache_id
    assert current == ObjectRef("s3", "b", "k", "e", 4, last_modified_ns=5)


def test_the_overlap_check_compares_the_place_a_source_reads() -> None:
    """A job whose input is filtered or pinned still waits for unfinished outputs under it."""
    assert location("s3://bk1/p/?include=*.nc&exclude=tmp/**") == "s3://bk1/p/"
    assert location("s3://bk1/k?versionId=v1") == "s3://bk1/k"
    assert location("s3://bk1/what?.txt") == "s3://bk1/what?.txt"  # the key's own '?'
    assert location("/shared/a?b") == "/shared/a?b"
    assert location("s3://bk1/p/") == "s3://bk1/p/"
