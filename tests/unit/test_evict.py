"""The pure eviction policy: TTL first, then LRU from the high down to the low watermark."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcstage.cache.evict import Entry, choose_evictions

NOW = 10_000.0
HOUR = 3600.0


def entry(name: str, size: int, age: float, leased: bool = False) -> Entry:
    """An entry last accessed ``age`` seconds before NOW."""
    return Entry(name, size, NOW - age, leased)


@pytest.mark.parametrize(
    ("entries", "capacity", "expected"),
    [
        pytest.param([entry("a", 40, 10), entry("b", 40, 20)], 100, [], id="below-high"),
        pytest.param([entry("a", 45, 10), entry("b", 45, 20)], 100, [], id="exactly-at-high"),
        pytest.param(
            [entry("a", 30, 10), entry("b", 30, 30), entry("c", 35, 20)],
            100,
            ["b", "c"],
            id="lru-down-to-low",
        ),
        pytest.param(
            [entry("a", 30, 10), entry("b", 30, 30, leased=True), entry("c", 35, 20)],
            100,
            ["c", "a"],
            id="leased-skipped",
        ),
        pytest.param(
            [entry("a", 60, 10, leased=True), entry("b", 40, 30, leased=True)],
            100,
            [],
            id="all-leased-stays-above-high",
        ),
        pytest.param(
            [entry("b", 50, 5), entry("a", 50, 5)],
            100,
            ["a"],
            id="ties-broken-by-id",
        ),
        pytest.param([entry("a", 10, 1)], 0, ["a"], id="zero-capacity-evicts-all-unleased"),
    ],
)
def test_watermarks(entries: list[Entry], capacity: int, expected: list[str]) -> None:
    assert choose_evictions(entries, capacity, 0.9, 0.5, math.inf, NOW) == expected


def test_ttl_evicts_stale_entries_even_below_high() -> None:
    entries = [entry("old", 1, 2 * HOUR), entry("new", 1, 10), entry("older", 1, 3 * HOUR)]
    assert choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW) == ["older", "old"]


def test_ttl_never_evicts_leased() -> None:
    entries = [entry("old", 1, 2 * HOUR, leased=True)]
    assert choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW) == []


def test_ttl_pass_can_make_the_lru_pass_unnecessary() -> None:
    entries = [entry("stale", 50, 2 * HOUR), entry("fresh", 45, 10)]
    assert choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW) == ["stale"]


def test_ttl_then_lru_in_order() -> None:
    entries = [entry("stale", 10, 2 * HOUR), entry("x", 50, 100), entry("y", 40, 50)]
    # The stale 10 bytes go by TTL; 90 is still above 80, so LRU takes x (older than y): 40.
    assert choose_evictions(entries, 100, 0.8, 0.5, HOUR, NOW) == ["stale", "x"]


def test_entry_exactly_ttl_old_stays() -> None:
    assert choose_evictions([entry("a", 1, HOUR)], 100, 0.9, 0.5, HOUR, NOW) == []


@pytest.mark.parametrize(
    ("capacity", "high", "low", "ttl"),
    [(-1, 0.9, 0.5, 1.0), (100, 0.5, 0.9, 1.0), (100, 0.9, -0.1, 1.0), (100, 0.9, 0.5, -1.0)],
)
def test_invalid_policy_is_refused(capacity: int, high: float, low: float, ttl: float) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        choose_evictions([], capacity, high, low, ttl, NOW)


entries_strategy = st.lists(
    st.builds(
        Entry,
        cache_id=st.text("abcdef0123456789", min_size=1, max_size=8),
        size=st.integers(0, 1000),
        last_access=st.floats(0, NOW),
        leased=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda e: e.cache_id,
)


@given(entries_strategy, st.integers(0, 10_000), st.floats(0, 1), st.floats(0, 1))
def test_policy_properties(entries: list[Entry], capacity: int, a: float, b: float) -> None:
    low, high = sorted((a, b))
    chosen = choose_evictions(entries, capacity, high, low, HOUR, NOW)
    by_id = {e.cache_id: e for e in entries}
    assert len(set(chosen)) == len(chosen)
    assert not any(by_id[c].leased for c in chosen)
    remaining = sum(e.size for e in entries) - sum(by_id[c].size for c in chosen)
    unleased_left = [e for e in entries if not e.leased and e.cache_id not in chosen]
    # Either the cache is back under its high mark, or nothing evictable is left.
    assert remaining <= high * capacity or not unleased_left
    # Stale unleased entries always go.
    assert all(e.last_access >= NOW - HOUR for e in unleased_left)


# --- objects counted as well as bytes (issue 15, item 8: zero-byte objects exhaust inodes) ---


def test_zero_byte_objects_over_the_object_mark_are_evicted_lru_down_to_the_low_mark() -> None:
    entries = [entry(f"z{i:02d}", 0, 100 - i) for i in range(20)]  # z00 the oldest
    chosen = choose_evictions(entries, 10**9, 0.9, 0.5, HOUR, NOW, max_objects=10)
    assert chosen == [f"z{i:02d}" for i in range(15)]  # 20 -> 5 = low * max_objects


def test_the_object_mark_alone_does_not_evict_bytes_below_their_mark() -> None:
    entries = [entry("big", 80, 50), *(entry(f"z{i}", 0, 40 - i) for i in range(9))]
    # 10 objects > 0.9 * 10: evict LRU down to 5 objects; "big" is the oldest and goes first,
    # since LRU order is what the policy follows, but only as many as the count needs.
    chosen = choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW, max_objects=10)
    assert len(chosen) == 5 and chosen[0] == "big"


def test_no_object_mark_means_bytes_only() -> None:
    entries = [entry(f"z{i}", 0, i) for i in range(1000)]
    assert choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW) == []
    assert choose_evictions(entries, 100, 0.9, 0.5, HOUR, NOW, max_objects=0) == []


@given(
    entries_strategy,
    st.integers(0, 10_000),
    st.integers(1, 40),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_policy_properties_with_an_object_mark(
    entries: list[Entry], capacity: int, max_objects: int, a: float, b: float
) -> None:
    low, high = sorted((a, b))
    chosen = choose_evictions(entries, capacity, high, low, HOUR, NOW, max_objects=max_objects)
    by_id = {e.cache_id: e for e in entries}
    assert not any(by_id[c].leased for c in chosen)
    left = [e for e in entries if e.cache_id not in chosen]
    unleased_left = [e for e in left if not e.leased]
    assert len(left) <= high * max_objects or not unleased_left
    assert sum(e.size for e in left) <= high * capacity or not unleased_left
