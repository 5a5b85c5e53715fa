"""Include/exclude filters on a prefix: which of the objects listed under it a stage-in takes.

A glob is matched against the part of the key after the prefix (``s3://b/data/`` and the key
``data/2024/a.nc``: ``2024/a.nc``), all of it (not a search inside it):

  ``*``       any run of characters except '/' (within one path component)
  ``?``       one character except '/'
  ``[abc]``   one of these characters (ranges ``[a-z]``, negated ``[!abc]``); never '/'
  ``**``      a whole component only: any number of components, none included, but at
              least one at the end (``**/*.nc`` is every ``.nc`` at any depth, ``2024/**``
              everything under 2024/, not an object named ``2024``)

Every other character stands for itself (no backslash escapes: ``[*]`` is a literal '*').
An object is taken when it matches some include (or there is none) and no exclude: an
exclude always wins. Unlike s5cmd, whose ``*`` crosses '/', a glob here reads like a path:
``*.nc`` takes the ``.nc`` files directly under the prefix, ``**/*.nc`` those at any depth.
Standard library only, pure.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from hpcstage.errors import DirectiveError

MAX_GLOBS = 100  # include and exclude globs in one directive
MAX_GLOB_CHARS = 1024  # as long as an S3 key


@dataclass(frozen=True)
class KeyFilter:
    """The include and exclude globs of one source (both empty: every object)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def takes(self, relative_key: str) -> bool:
        """Whether the object at ``relative_key`` (its key after the prefix) is staged."""
        if any(_compiled(glob).fullmatch(relative_key) for glob in self.exclude):
            return False
        return not self.include or any(_compiled(g).fullmatch(relative_key) for g in self.include)


def checked_filter(include: tuple[str, ...], exclude: tuple[str, ...]) -> KeyFilter:
    """A KeyFilter of these globs; DirectiveError naming the first bad one."""
    if len(include) + len(exclude) > MAX_GLOBS:
        raise DirectiveError(f"more than {MAX_GLOBS} include/exclude globs in one directive")
    for name, globs in (("include", include), ("exclude", exclude)):
        for glob in globs:
            try:
                _compiled(glob)
            except DirectiveError as err:
                raise DirectiveError(f"{name}={glob[:80]!r}: {err}") from None
    return KeyFilter(include, exclude)


@functools.lru_cache(maxsize=1024)
def _compiled(glob: str) -> re.Pattern[str]:
    """The glob as a regular expression over a relative key (DirectiveError if malformed).

    Globs come from users and keys from the store, so matching must not backtrack
    exponentially (``*a*a*a*a*b`` against ``aaaa...``, or ``**/**/**/x`` against a deep key):
    as in CPython's fnmatch, every wildcard but the last of its kind takes the earliest
    match of what follows it inside an atomic group, which is always right for a glob and
    keeps the work polynomial of low degree."""
    if not glob:
        raise DirectiveError("the glob is empty")
    if len(glob) > MAX_GLOB_CHARS:
        raise DirectiveError(f"the glob is longer than {MAX_GLOB_CHARS} characters")
    if glob.startswith("/"):
        raise DirectiveError("the glob starts with '/' (it is relative to the prefix)")
    parts = _components(glob)
    try:
        return re.compile(_components_regex(parts), re.DOTALL)
    except re.error as err:  # e.g. a reversed range, [z-a]
        raise DirectiveError(f"not a valid glob ({err})") from None


def _components(glob: str) -> list[str]:
    """The glob's '/'-separated components, checked, runs of '**' folded into one."""
    parts: list[str] = []
    split = glob.split("/")
    for index, part in enumerate(split):
        if "**" in part and part != "**":
            raise DirectiveError("'**' must be a whole path component (as in 'a/**/b.nc')")
        if not part and index < len(split) - 1:
            raise DirectiveError("the glob has an empty component ('//')")
        if not (part == "**" and parts and parts[-1] == "**"):
            parts.append(part)
    return parts


def _components_regex(parts: list[str]) -> str:
    """Components as a regex: ``**`` is any number of whole components. Each ``**`` but the
    last takes the earliest run of components that matches what follows it, atomically."""
    last_any = max((i for i, part in enumerate(parts) if part == "**"), default=-1)
    out: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        if part == "**" and index == len(parts) - 1:
            out.append(".*")
        elif part == "**" and index < last_any:
            following = parts.index("**", index + 1)
            run = "".join(_component(p) + "/" for p in parts[index + 1 : following])
            out.append(f"(?>(?:[^/]*/)*?{run})")
            index = following
            continue
        elif part == "**":
            out.append("(?:[^/]*/)*")
        else:
            out.append(_component(part) + ("/" if index < len(parts) - 1 else ""))
        index += 1
    return "".join(out)


def _component(part: str) -> str:
    """One component (no '/') as a regex: ``*`` any run within it, each ``*`` but the last
    taking the earliest match of what follows it (atomically), as fnmatch does."""
    pieces = _tokens(part)
    stars = [i for i, piece in enumerate(pieces) if piece is None]
    if not stars:
        return "".join(p for p in pieces if p is not None)
    out = ["".join(p for p in pieces[: stars[0]] if p is not None)]
    for star, following in zip(stars, [*stars[1:], len(pieces)], strict=True):
        segment = "".join(p for p in pieces[star + 1 : following] if p is not None)
        out.append(f"[^/]*{segment}" if star == stars[-1] else f"(?>[^/]*?{segment})")
    return "".join(out)


def _tokens(part: str) -> list[str | None]:
    """The component's pieces: one regex per character or class, None for each ``*``."""
    out: list[str | None] = []
    index = 0
    while index < len(part):
        char = part[index]
        if char == "*":
            out.append(None)
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            cls, index = _char_class(part, index)
            out.append(cls)
            continue
        else:
            out.append(re.escape(char))
        index += 1
    return out


def _char_class(part: str, start: int) -> tuple[str, int]:
    """The class opening at ``part[start]`` ('[') as a regex, and the index after its ']'."""
    index = start + 1
    negate = index < len(part) and part[index] in "!^"
    index += negate
    body_start = index
    if index < len(part) and part[index] == "]":
        index += 1  # a ']' first in the class is literal, as in fnmatch
    close = part.find("]", index)
    if close < 0:
        raise DirectiveError(f"'[' at character {start + 1} has no closing ']'")
    body = "".join(c if c == "-" else re.escape(c) for c in part[body_start:close])
    # '/' never matches: it separates components.
    return (f"[^/{body}]" if negate else f"(?!/)[{body}]"), close + 1
