"""Slurm hostlist expansion and compression."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcstage.errors import SlurmError
from hpcstage.watch.slurm.hostlist import MAX_HOSTS, compress_hostlist, expand_hostlist


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("", ()),
        ("login", ("login",)),
        ("n[1-3,5]", ("n1", "n2", "n3", "n5")),
        ("gpu[01-02]", ("gpu01", "gpu02")),
        (
            "n[1-3,5],gpu[01-02],login",
            ("n1", "n2", "n3", "n5", "gpu01", "gpu02", "login"),
        ),
        ("n[08-10]", ("n08", "n09", "n10")),  # padding from the low bound
        ("n[9-11]", ("n9", "n10", "n11")),  # no padding: widths grow
        ("n[007]", ("n007",)),
        ("rack[1-2]-n[1-2]", ("rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2")),
        ("[1-3]", ("1", "2", "3")),
        ("n[1-2]-ib", ("n1-ib", "n2-ib")),
        ("n1,n1", ("n1", "n1")),  # Slurm keeps duplicates
        ("  n[1-2]\n", ("n1", "n2")),
    ],
)
def test_expand(text: str, hosts: tuple[str, ...]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text",
    [
        "n[1-3",
        "n1-3]",
        "n[[1-2]]",
        "n[a-b]",
        "n[3-1]",
        "n[]",
        "n[1-]",
        "n[1,,2]",
        "a,,b",
        ",a",
        "a,",
        "n[1-2:1]",
        "a, b",
        f"n[1-{MAX_HOSTS + 1}]",
        "a[1-1000]b[1-1000]c[1-1000]",
    ],
)
def test_expand_refuses_malformed(text: str) -> None:
    with pytest.raises(SlurmError, match="hostlist"):
        expand_hostlist(text)


@pytest.mark.parametrize(
    ("hosts", "text"),
    [
        ((), ""),
        (("n1", "n2", "n3", "n5"), "n[1-3,5]"),
        (("gpu01", "gpu02"), "gpu[01-02]"),
        (("n1", "n2", "n3", "n5", "gpu01", "gpu02", "login"), "n[1-3,5],gpu[01-02],login"),
        (("n09", "n10", "n11"), "n[09-11]"),
        (("n9", "n10"), "n[9-10]"),
        (("n3", "n1", "n2"), "n[3,1-2]"),  # order is kept, not sorted
        (("n5",), "n5"),
        (("n1", "m1", "n2"), "n1,m1,n2"),
    ],
)
def test_compress(hosts: tuple[str, ...], text: str) -> None:
    assert compress_hostlist(hosts) == text
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("host", ["", "a,b", "n[1]", " n1"])
def test_compress_refuses_non_hosts(host: str) -> None:
    with pytest.raises(SlurmError, match="not a host name"):
        compress_hostlist(["n1", host])


host_names = st.text(alphabet="ab-0123456789", min_size=1, max_size=8)
numbered = st.builds(
    lambda prefix, number, width: f"{prefix}{number:0{width}d}",
    st.sampled_from(["n", "gpu", "rack1-n", ""]),
    st.integers(min_value=0, max_value=120),
    st.integers(min_value=0, max_value=4),
)


@given(st.lists(host_names | numbered, max_size=30))
def test_compress_round_trips(hosts: list[str]) -> None:
    assert expand_hostlist(compress_hostlist(hosts)) == tuple(hosts)


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=2, max_value=500))
def test_a_run_compresses_to_one_range(low: int, count: int) -> None:
    hosts = [f"n{number}" for number in range(low, low + count)]
    assert compress_hostlist(hosts) == f"n[{low}-{low + count - 1}]"
