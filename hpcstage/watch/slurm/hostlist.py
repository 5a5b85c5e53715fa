"""Slurm hostlist expressions: ``n[1-3,5],gpu[01-02],login`` <-> a tuple of host names.

Grammar, as Slurm writes it: a comma-separated list of items; an item is literal text with zero
or more bracket groups ``[R,R,...]``; each ``R`` is ``N`` or ``LO-HI`` (decimal).  A range whose
low bound has a leading zero is zero-padded to that width (``[08-10]`` -> 08, 09, 10).  Several
bracket groups in one item multiply out, leftmost slowest (``r[1-2]n[1-2]`` -> r1n1, r1n2, ...).
Expansion keeps order and duplicates, as Slurm's own iterator does.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from hpcstage.errors import SlurmError

# A hostlist longer than this is a typo or an attack, not a cluster: refuse before allocating.
MAX_HOSTS = 1_000_000

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_TRAILING_DIGITS = re.compile(r"^(.*?)(\d*)$", re.DOTALL)


def expand_hostlist(text: str) -> tuple[str, ...]:
    """Expand a Slurm hostlist expression into host names; raise SlurmError if malformed."""
    text = text.strip()
    if not text:
        return ()
    hosts: list[str] = []
    for item in _split_items(text):
        hosts.extend(_expand_item(item, text))
        if len(hosts) > MAX_HOSTS:
            raise SlurmError(f"hostlist expands to more than {MAX_HOSTS} hosts: {_excerpt(text)}")
    return tuple(hosts)


def compress_hostlist(hosts: Iterable[str]) -> str:
    """Write host names as a compact hostlist that expands back to exactly the same sequence."""
    groups: list[_Group] = []
    for host in hosts:
        if not host or any(c in host for c in "[],") or host != host.strip():
            raise SlurmError(f"not a host name: {host!r}")
        prefix, digits = _split_number(host)
        if not (groups and groups[-1].accepts(prefix, digits)):
            groups.append(_Group(prefix, _width(digits)))
        groups[-1].add(digits)
    return ",".join(group.render() for group in groups)


def _split_items(text: str) -> Iterator[str]:
    """Split on commas outside brackets, checking that brackets balance and never nest."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            yield _non_empty(text[start:i], text)
            start = i + 1
        if depth not in (0, 1):
            raise SlurmError(f"unbalanced or nested brackets in hostlist: {_excerpt(text)}")
    if depth != 0:
        raise SlurmError(f"unbalanced brackets in hostlist: {_excerpt(text)}")
    yield _non_empty(text[start:], text)


def _non_empty(item: str, text: str) -> str:
    if not item or item != item.strip():
        raise SlurmError(f"empty or blank item in hostlist: {_excerpt(text)}")
    return item


def _expand_item(item: str, text: str) -> Iterator[str]:
    """Expand one item: literal pieces and bracket groups, multiplied out in order."""
    pieces = re.split(r"\[([^\]]*)\]", item)
    # re.split with one group alternates literal, group, literal, ...
    choices: list[list[str]] = []
    total = 1
    for index, piece in enumerate(pieces):
        options = _expand_ranges(piece, text) if index % 2 else [piece]
        total *= len(options)
        if total > MAX_HOSTS:
            raise SlurmError(f"hostlist expands to more than {MAX_HOSTS} hosts: {_excerpt(text)}")
        choices.append(options)
    return ("".join(parts) for parts in itertools.product(*choices))


def _expand_ranges(body: str, text: str) -> list[str]:
    names: list[str] = []
    for spec in body.split(","):
        match = _RANGE.fullmatch(spec)
        if match is None:
            raise SlurmError(f"bad range {spec!r} in hostlist: {_excerpt(text)}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise SlurmError(f"descending range {spec!r} in hostlist: {_excerpt(text)}")
        if len(names) + int(high) - int(low) >= MAX_HOSTS:
            raise SlurmError(f"hostlist expands to more than {MAX_HOSTS} hosts: {_excerpt(text)}")
        width = _width(low)
        names.extend(f"{n:0{width}d}" for n in range(int(low), int(high) + 1))
    return names


def _width(digits: str) -> int:
    """Zero-padding width implied by a number as written: '007' -> 3, '7' or '70' -> 0."""
    return len(digits) if len(digits) > 1 and digits.startswith("0") else 0


def _split_number(host: str) -> tuple[str, str]:
    match = _TRAILING_DIGITS.match(host)
    assert match is not None  # the pattern matches every string
    return match.group(1), match.group(2)


@dataclass
class _Group:
    """Hosts sharing a prefix and padding, as consecutive runs [low, high] in input order."""

    prefix: str
    width: int
    runs: list[list[int]] = field(default_factory=list)
    bare: bool = False  # a host with no trailing number: rendered as the prefix alone

    def accepts(self, prefix: str, digits: str) -> bool:
        if self.bare or not digits or prefix != self.prefix:
            return False
        # The number must print back exactly as written with this group's padding.
        return f"{int(digits):0{self.width}d}" == digits

    def add(self, digits: str) -> None:
        if not digits:
            self.bare = True
            return
        number = int(digits)
        if self.runs and self.runs[-1][1] + 1 == number:
            self.runs[-1][1] = number
        else:
            self.runs.append([number, number])

    def render(self) -> str:
        if self.bare:
            return self.prefix
        specs = [self._spec(low, high) for low, high in self.runs]
        if len(specs) == 1 and self.runs[0][0] == self.runs[0][1]:
            return self.prefix + specs[0]
        return f"{self.prefix}[{','.join(specs)}]"

    def _spec(self, low: int, high: int) -> str:
        first = f"{low:0{self.width}d}"
        return first if low == high else f"{first}-{high:0{self.width}d}"


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
