"""Which unfinished outputs a job's inputs overlap, answered from an index (pure).

Two locations (s3:// URLs or paths; a prefix ends with '/') overlap when they can name the
same object: they are equal, or one ends with '/' and the other starts with it. A job waits
for another job whose unfinished outputs overlap one of its inputs.

Comparing every input of every job with every output of every job costs J²·I·O per tick,
minutes at a few dozen big jobs, on the loop that also serves the API. The index sorts the
outputs once (O(n log n)) and answers one input in O(log n + d + hits), d being the number of
'/' in the input, because the outputs that overlap input ``a`` are:

1. those under ``a`` when ``a`` ends with '/': in sorted order a contiguous run, from ``a`` up
   to ``a`` with its final '/' replaced by '0' (the next code point), found by bisection;
2. those equal to ``a`` or to one of its own '/'-ended prefixes ``a[:i+1]``: at most d exact
   runs, each found in a dict from location to run.

Whether a run holds an output of a job other than the asking one is O(1): for every position
the index keeps where the next different owner starts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator


def overlaps(a: str, b: str) -> bool:
    """Whether locations ``a`` and ``b`` (s3:// URLs or paths; a prefix ends with '/') can
    name the same object: equal, or one a prefix the other lies under. s3://b/a does not
    overlap s3://b/ab/, nor s3://b/out/x s3://b/out/xy."""
    return a == b or (a.endswith("/") and b.startswith(a)) or (b.endswith("/") and a.startswith(b))


class OutputIndex:
    """Unfinished outputs as (location, owner) pairs, sorted for prefix and exact look-ups."""

    def __init__(self, outputs: Iterable[tuple[str, str]]) -> None:
        pairs = sorted(outputs)
        self._locations = [location for location, _ in pairs]
        self._owners = [owner for _, owner in pairs]
        # _next_other[i]: the first j > i whose owner differs from the owner at i (n if none).
        n = len(pairs)
        self._next_other = [n] * n
        for i in range(n - 2, -1, -1):
            same = self._owners[i + 1] == self._owners[i]
            self._next_other[i] = self._next_other[i + 1] if same else i + 1
        self._run_of: dict[str, tuple[int, int]] = {}  # location -> [lo, hi) of its copies
        for i, location in enumerate(self._locations):
            lo, _ = self._run_of.get(location, (i, i))
            self._run_of[location] = (lo, i + 1)
        self._prefix_lengths = {len(loc) for loc in self._run_of if loc.endswith("/")}

    def __len__(self) -> int:
        return len(self._locations)

    def overlapping(self, location: str) -> Iterator[tuple[str, str]]:
        """Every (output, owner) that overlaps ``location``."""
        for lo, hi in self._runs(location):
            for i in range(lo, hi):
                yield self._locations[i], self._owners[i]

    def other_owner(self, location: str, me: str) -> str:
        """An owner other than ``me`` of an output overlapping ``location``; '' when none."""
        for lo, hi in self._runs(location):
            found = self._other_in(lo, hi, me)
            if found:
                return found
        return ""

    def _runs(self, location: str) -> Iterator[tuple[int, int]]:
        """Disjoint [lo, hi) runs of the sorted outputs that overlap ``location``."""
        if location.endswith("/"):
            # Outputs under it, itself included: every s with location <= s < upper.
            upper = location[:-1] + chr(ord("/") + 1)
            yield bisect_left(self._locations, location), bisect_left(self._locations, upper)
        elif location in self._run_of:
            yield self._run_of[location]
        # Its proper '/'-ended prefixes, those only whose length some '/'-ended output has.
        end = location.find("/")
        while 0 <= end < len(location) - 1:
            if end + 1 in self._prefix_lengths:
                found = self._run_of.get(location[: end + 1])
                if found is not None:
                    yield found
            end = location.find("/", end + 1)

    def _other_in(self, lo: int, hi: int, me: str) -> str:
        if lo >= hi:
            return ""
        if self._owners[lo] != me:
            return self._owners[lo]
        j = self._next_other[lo]
        return self._owners[j] if j < hi else ""


def waits_for(inputs: Iterable[str], me: str, outputs: OutputIndex) -> str:
    """The owner of an unfinished output that one of ``inputs`` overlaps, other than ``me``
    (a job never waits for itself); '' when none."""
    if not outputs:  # the common case: no unfinished output anywhere
        return ""
    for src in inputs:
        found = outputs.other_owner(src, me)
        if found:
            return found
    return ""
