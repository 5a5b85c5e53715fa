"""TOML text beyond what :mod:`tomllib` gives: key paths, the line each key is on, and writing.

``tomllib`` keeps no positions, so :func:`locate_keys` scans the text for table headers and
``key =`` lines to let a problem name its line; :func:`dumps` writes the plain data of the
effective settings back as TOML. Standard library only: nothing here knows the schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

Loc = tuple[str | int, ...]
"""A path into the TOML document: ``("policy", "rules", 0, "read")``."""

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def dotted(loc: Loc) -> str:
    """Render a location as a dotted key: ``policy.rules[0].read``, ``quotas.accounts."a.b"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_toml_key(part)}" if out else _toml_key(part)
    return out


# ---------------------------------------------------------------------------------------------
# Where is a key? A small scanner of TOML text (tomllib keeps no positions).
# ---------------------------------------------------------------------------------------------

_KEY_PART: Final = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def locate_keys(text: str) -> dict[Loc, int]:
    """Map each table and key path in TOML ``text`` to the 1-based line that defines it.

    Tracks ``[table]`` and ``[[array.of.tables]]`` headers (elements get indices, as in pydantic's
    error locations) and dotted keys; skips multi-line strings and arrays. Good enough for
    hand-written files: anything it cannot follow simply has no line.
    """
    scanner = _Locator()
    for number, line in enumerate(text.splitlines(), start=1):
        scanner.feed(line, number)
    return scanner.lines


def line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc``, else of its nearest enclosing table or key that is in the file."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _parse_key(text: str, pos: int = 0) -> tuple[list[str], int] | None:
    """Parse a (dotted, possibly quoted) key at ``pos``; return its parts and the end position."""
    parts: list[str] = []
    while match := _KEY_PART.match(text, pos):
        parts.append(next(group for group in match.groups() if group is not None))
        pos = match.end()
        if not text.startswith(".", pos):
            return parts, pos
        pos += 1
    return None


class _ValueScanner:
    """Follows strings and brackets so lines inside multi-line values are not taken for keys."""

    def __init__(self) -> None:
        self.depth = 0
        self.string: str | None = None  # the delimiter of an open multi-line string

    def open(self) -> bool:
        return self.depth > 0 or self.string is not None

    def scan(self, text: str) -> None:
        pos = 0
        while pos < len(text):
            pos = self._close_string(text, pos) if self.string else self._step(text, pos)

    def _close_string(self, text: str, pos: int) -> int:
        assert self.string is not None
        end = text.find(self.string, pos)
        if end < 0:
            return len(text)
        self.string = None
        return end + 3

    def _step(self, text: str, pos: int) -> int:
        char = text[pos]
        if char == "#":
            return len(text)
        if text.startswith(('"""', "'''"), pos):
            self.string = text[pos : pos + 3]
            return pos + 3
        if char in "\"'":
            return _skip_string(text, pos)
        self.depth += (char in "[{") - (char in "]}")
        return pos + 1


def _skip_string(text: str, pos: int) -> int:
    quote, pos = text[pos], pos + 1
    while pos < len(text) and text[pos] != quote:
        pos += 2 if quote == '"' and text[pos] == "\\" else 1
    return pos + 1


class _Locator:
    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.table: Loc = ()
        self.arrays: dict[Loc, int] = {}  # array-of-tables path -> index of its last element
        self.value = _ValueScanner()

    def feed(self, line: str, number: int) -> None:
        if self.value.open():
            self.value.scan(line)
            return
        stripped = line.strip()
        if stripped.startswith("[["):
            self._array_header(stripped[2:], number)
        elif stripped.startswith("["):
            self._table_header(stripped[1:], number)
        elif stripped and not stripped.startswith("#"):
            self._key_value(stripped, number)

    def _resolve(self, parts: list[str]) -> Loc:
        """Insert array-of-tables indices: policy.rules.x -> ("policy", "rules", 2, "x")."""
        out: Loc = ()
        for part in parts:
            out = (*out, part)
            if out in self.arrays:
                out = (*out, self.arrays[out])
        return out

    def _table_header(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed:
            self.table = self._resolve(parsed[0])
            self._record(self.table, number)

    def _array_header(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed:
            array = (*self._resolve(parsed[0][:-1]), parsed[0][-1])
            self.arrays[array] = self.arrays.get(array, -1) + 1
            self.table = (*array, self.arrays[array])
            self._record(self.table, number)

    def _key_value(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed and text.startswith("=", parsed[1]):
            self._record((*self.table, *parsed[0]), number)
            self.value.scan(text[parsed[1] + 1 :])

    def _record(self, loc: Loc, number: int) -> None:
        # A dotted key or header also defines its parent tables, which may have no header.
        for end in range(1, len(loc) + 1):
            self.lines.setdefault(loc[:end], number)


# ---------------------------------------------------------------------------------------------
# Writing TOML.
# ---------------------------------------------------------------------------------------------


def dumps(data: dict[str, Any]) -> str:
    """``data`` (top-level tables of JSON-ready values) as TOML text that loads back to it,
    except that None is written as "" (every optional setting spells "unset" that way)."""
    lines: list[str] = []
    for name, section in data.items():
        lines += _toml_table(f"[{name}]", (name,), section)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(header: str, path: tuple[str, ...], table: dict[str, Any]) -> list[str]:
    lines = ["", header]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not _nested(v)]
    for key, value in table.items():
        sub = (*path, key)
        name = ".".join(_toml_key(p) for p in sub)
        if isinstance(value, dict):
            lines += _toml_table(f"[{name}]", sub, value)
        elif _nested(value):
            for item in value:
                lines += _toml_table(f"[[{name}]]", sub, item)
    return lines


def _nested(value: Any) -> bool:
    is_table_array = isinstance(value, list) and bool(value) and isinstance(value[0], dict)
    return isinstance(value, dict) or is_table_array


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'  # every optional setting spells "unset" as ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON's string escapes and number syntax are valid TOML.
    return json.dumps(value, ensure_ascii=False)
