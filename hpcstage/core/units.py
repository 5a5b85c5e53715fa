"""Sizes and durations as people write them in the site TOML: ``"64MiB"``, ``"15m"`` or numbers.

Pure functions; every failure is a ``ValueError`` whose message says what was expected, so the
config loader can show it next to the key and line.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Final

# Decimal and binary units are both common on storage hardware and in S3 docs, so both are accepted
# and neither is guessed: a bare "G" is refused rather than silently meaning one or the other.
_SIZE_UNITS: Final[dict[str, int]] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_AMBIGUOUS_UNITS: Final = frozenset({"k", "m", "g", "t", "p"})
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_HINT: Final = (
    "expected a number of bytes or a string like '64MiB' or '1.5GB' "
    "(units B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
)

_DURATION_UNITS: Final[dict[str, float]] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART: Final = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)"
_DURATION_RE: Final = re.compile(rf"(?:\s*{_DURATION_PART})+\s*")
_DURATION_HINT: Final = (
    "expected seconds or a number with a unit: ms, s, m, h, d (e.g. '90s', '1h30m')"
)

# format_* pick the largest unit that represents the value exactly, so output parses back unchanged.
_FORMAT_SIZE_UNITS: Final = (
    ("PiB", 2**50),
    ("TiB", 2**40),
    ("GiB", 2**30),
    ("MiB", 2**20),
    ("KiB", 2**10),
    ("PB", 10**15),
    ("TB", 10**12),
    ("GB", 10**9),
    ("MB", 10**6),
    ("KB", 10**3),
)
_FORMAT_DURATION_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60))


def parse_size(value: str | int | float) -> int:
    """Return a size in bytes: ``"64MiB"`` -> 67108864, ``"1.5GB"`` -> 1500000000, ``4096`` -> 4096.

    Units are case-insensitive; KB/MB/GB/TB/PB are powers of 10, KiB/MiB/GiB/TiB/PiB powers of 2,
    and a plain number is bytes. Raises ``ValueError`` for anything else, for negative sizes and
    for fractions of a byte.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: {_SIZE_HINT}")
    if isinstance(value, int | float):
        return _whole_bytes(_number(value, "size"), repr(value))
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: {_SIZE_HINT}")
    return _parse_size_text(value)


def _parse_size_text(text: str) -> int:
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: {_SIZE_HINT}")
    number, unit = match.groups()
    if unit.lower() in _AMBIGUOUS_UNITS:
        raise ValueError(
            f"ambiguous size unit {unit!r} in {text!r}: write {unit.upper()}B (powers of 1000) "
            f"or {unit.upper()}iB (powers of 1024)"
        )
    factor = _SIZE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}: {_SIZE_HINT}")
    return _whole_bytes(Decimal(number) * factor, repr(text))


def _number(value: int | float, what: str) -> Decimal:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"invalid {what} {value!r}: must be a finite number")
    if value < 0:
        raise ValueError(f"invalid {what} {value!r}: must not be negative")
    try:
        return Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - finite floats always convert
        raise ValueError(f"invalid {what} {value!r}") from exc


def _whole_bytes(amount: Decimal, shown: str) -> int:
    if amount != amount.to_integral_value():
        raise ValueError(f"invalid size {shown}: not a whole number of bytes ({amount})")
    return int(amount)


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds: ``"90s"`` -> 90.0, ``"15m"`` -> 900.0, ``"1h30m"`` -> 5400.0.

    Units are ms, s, m, h, d (lower case: ``M`` could be read as months); parts may be combined and
    a plain number (or numeric string) is seconds. Raises ``ValueError`` for anything else or < 0.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    if isinstance(value, int | float):
        return float(_number(value, "duration"))
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    return _parse_duration_text(value)


def _parse_duration_text(text: str) -> float:
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return float(stripped)
    if not _DURATION_RE.fullmatch(stripped):
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HINT}")
    parts = re.findall(_DURATION_PART, stripped)
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_rate(value: str | int | float) -> int:
    """Return a bandwidth in bytes per second: ``"200MiB/s"`` -> 209715200, ``"1GB"`` ->
    1000000000, ``8388608`` -> 8388608.

    A size as :func:`parse_size` reads it, with an optional ``/s``; 0 is a valid rate (the
    settings read it as "unlimited"). Raises ``ValueError`` like ``parse_size``.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
        try:
            return parse_size(text)
        except ValueError as exc:
            message = str(exc).replace("invalid size", "invalid rate", 1)
            raise ValueError(message.replace(repr(text), repr(value))) from exc
    return parse_size(value)


def format_rate(bytes_per_second: int) -> str:
    """Render a bandwidth so that it parses back: 209715200 -> ``"200MiB/s"``, 0 -> ``"0"``."""
    return f"{format_size(bytes_per_second)}/s" if bytes_per_second else "0"


def format_size(num_bytes: int) -> str:
    """Render bytes in the largest exact unit: 536870912000 -> ``"500GiB"``, 0 -> ``"0B"``."""
    for unit, factor in _FORMAT_SIZE_UNITS:
        if num_bytes and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return f"{num_bytes}B"


def format_duration(seconds: float) -> str:
    """Render seconds in the largest unit that is exact: 604800 -> ``"7d"``, 0.5 -> ``"0.5s"``."""
    if seconds and float(seconds).is_integer():
        for unit, factor in _FORMAT_DURATION_UNITS:
            if int(seconds) % factor == 0:
                return f"{int(seconds) // factor}{unit}"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    # Positional notation: repr() may say "1e-05", which parse_duration does not accept.
    return f"{Decimal(repr(float(seconds))):f}s"
