"""Sizes and durations as written in the site TOML."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpcstage.core.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        (5e11, 500_000_000_000),
        ("0", 0),
        ("4096", 4096),
        ("1B", 1),
        ("1KB", 1000),
        ("1MB", 10**6),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("64MiB", 64 * 2**20),
        ("500GiB", 500 * 2**30),
        ("2TiB", 2 * 2**40),
        ("1PiB", 2**50),
        ("1.5GiB", 3 * 2**29),
        ("0.5KB", 500),
        ("0.1GB", 100_000_000),  # exact: no float rounding
        (" 10 MB ", 10**7),
        ("64mib", 64 * 2**20),
        ("64MIB", 64 * 2**20),
    ],
)
def test_parse_size(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "invalid size ''"),
        ("lots", "expected a number of bytes or a string like '64MiB'"),
        ("-1", "invalid size '-1'"),
        (-1, "must not be negative"),
        ("10G", "ambiguous size unit 'G'"),
        ("10 k", "write KB (powers of 1000) or KiB (powers of 1024)"),
        ("10XB", "unknown size unit 'XB'"),
        ("1.5B", "not a whole number of bytes"),
        (1.5, "not a whole number of bytes"),
        ("1GiB 2MiB", "invalid size"),
        ("1e9", "invalid size '1e9'"),
        (True, "invalid size True"),
        (None, "invalid size None"),
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        ([1], "invalid size [1]"),
    ],
)
def test_parse_size_rejects(value: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_size(value)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0.0),
        (90, 90.0),
        (1.5, 1.5),
        ("0", 0.0),
        ("90", 90.0),
        ("2.5", 2.5),
        ("90s", 90.0),
        ("0.5s", 0.5),
        ("250ms", 0.25),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1d 12h", 129600.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration(text: str | int | float, expected: float) -> None:
    assert parse_duration(text) == expected
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "invalid duration ''"),
        ("5 minutes", "expected seconds or a number with a unit"),
        ("5M", "invalid duration '5M'"),  # M could be months: refused, not guessed
        ("-5s", "must not be negative"),
        (-1, "must not be negative"),
        ("s", "invalid duration 's'"),
        ("1h-30m", "invalid duration"),
        ("1.s", "invalid duration"),
        (True, "invalid duration True"),
        (None, "invalid duration None"),
        (float("inf"), "must be a finite number"),
    ],
)
def test_parse_duration_rejects(value: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(0, "0B"), (1, "1B"), (1000, "1KB"), (1024, "1KiB"), (64 * 2**20, "64MiB"), (1023, "1023B")],
)
def test_format_size(num_bytes: int, text: str) -> None:
    assert format_size(num_bytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.5, "0.5s"),
        (1e-05, "0.00001s"),
        (90.0, "90s"),
        (900.0, "15m"),
        (604800.0, "7d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_size_round_trip(num_bytes: int) -> None:
    assert parse_size(format_size(num_bytes)) == num_bytes


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
