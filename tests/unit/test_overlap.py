"""Which unfinished outputs a job's inputs overlap: the index against the pairwise predicate."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcstage.core.overlap import OutputIndex, overlaps, waits_for

# Few characters, '/' and its neighbours in code-point order ('.' < '/' < '0') among them, so
# that random locations share prefixes and hit every boundary the sorted index depends on.
SEGMENTS = ["a", "ab", "b", ".", "0", "a.", "a0", "", "é"]


def location() -> st.SearchStrategy[str]:
    parts = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=4)
    return st.builds(
        lambda bucket, ps, prefix: f"s3://{bucket}/" + "/".join(ps) + ("/" if prefix else ""),
        st.sampled_from(["b", "c", "b0"]),
        parts,
        st.booleans(),
    ) | st.sampled_from(["", "/", "s3://", "s3:/", "/shared/p/", "/shared/p"])


OUTPUTS = st.lists(st.tuples(location(), st.sampled_from(["1", "2", "3"])), max_size=30)


def brute_waits_for(inputs: list[str], me: str, outputs: list[tuple[str, str]]) -> str:
    """The daemon's check before the index (4f7f2a1: daemon._waits_for), as the reference."""
    for src in inputs:
        for dest, other in outputs:
            if other != me and overlaps(src, dest):
                return other
    return ""


@given(OUTPUTS, location())
@settings(max_examples=1000, deadline=None)
def test_the_index_finds_exactly_the_overlapping_outputs(
    outputs: list[tuple[str, str]], src: str
) -> None:
    expected = sorted(o for o in outputs if overlaps(src, o[0]))
    assert sorted(OutputIndex(outputs).overlapping(src)) == expected


@given(OUTPUTS, st.lists(location(), max_size=5), st.sampled_from(["1", "2", "3", "4"]))
@settings(max_examples=1000, deadline=None)
def test_a_job_waits_exactly_when_the_pairwise_check_says_so(
    outputs: list[tuple[str, str]], inputs: list[str], me: str
) -> None:
    found = waits_for(inputs, me, OutputIndex(outputs))
    assert bool(found) == bool(brute_waits_for(inputs, me, outputs))
    if found:  # whom it waits for: another job that writes where one of its inputs reads
        assert found != me
        assert any(o == found and overlaps(s, d) for s in inputs for d, o in outputs)


def test_seeded_random_locations_agree_with_the_pairwise_check() -> None:
    rng = random.Random(15)  # noqa: S311 - reproducible test data
    for _ in range(300):
        outputs = [
            (
                "s3://b/"
                + "/".join(rng.choices(SEGMENTS, k=rng.randint(0, 3)))
                + rng.choice(["", "/"]),
                rng.choice("123"),
            )
            for _ in range(rng.randint(0, 40))
        ]
        index = OutputIndex(outputs)
        for _ in range(20):
            src = "s3://b/" + "/".join(rng.choices(SEGMENTS, k=rng.randint(0, 3)))
            src += rng.choice(["", "/"])
            assert sorted(index.overlapping(src)) == sorted(
                o for o in outputs if overlaps(src, o[0])
            )
            me = rng.choice("1234")
            assert bool(waits_for([src], me, index)) == bool(brute_waits_for([src], me, outputs))


@pytest.mark.parametrize(
    ("src", "dest", "expected"),
    [
        ("s3://b/a", "s3://b/ab/", False),  # no '/' boundary
        ("s3://b/ab/", "s3://b/a", False),
        ("s3://b/a/", "s3://b/ab/", False),
        ("s3://b/a/", "s3://b/a.", False),  # '.' sorts just before '/'
        ("s3://b/a/", "s3://b/a0", False),  # '0' sorts just after '/'
        ("s3://b/a/", "s3://b/a/0", True),
        ("s3://b/a/", "s3://b/a/", True),
        ("s3://b/a", "s3://b/a/", False),  # a key and the prefix of the same name
        ("s3://b/a/x", "s3://b/", True),
        ("s3://b/a/x", "s3://b/a", False),
        ("s3://b/out/x", "s3://b/out/xy", False),
        ("s3://b/p/", "s3://c/p/", False),
    ],
)
def test_boundaries(src: str, dest: str, expected: bool) -> None:
    assert overlaps(src, dest) is expected
    index = OutputIndex([(dest, "2")])
    assert (list(index.overlapping(src)) == [(dest, "2")]) is expected
    assert (waits_for([src], "1", index) == "2") is expected


def test_a_job_does_not_wait_for_its_own_outputs_even_among_many() -> None:
    own = [(f"s3://b/p/out/{i}", "1") for i in range(1000)]
    index = OutputIndex([*own, ("s3://b/p/zz", "2")])
    assert waits_for(["s3://b/p/out/"], "1", index) == ""
    assert waits_for(["s3://b/p/"], "1", index) == "2"
    assert waits_for(["s3://b/p/out/7"], "2", index) == "1"
