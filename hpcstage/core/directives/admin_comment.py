"""The bridge through Slurm's ``admin_comment``: directives a job_submit.lua copied there from
the SPANK job environment, where anyone (and so the daemon) may read them::

      hpcstage:v1:in=<value>;out=<value>;...;end

Each value is percent-encoded (UTF-8) except ``A-Z a-z 0-9 - . _ ~ / : = , @ +``, so the block
has no spaces or ';' of its own and other text may surround it (separated by whitespace). The
final ``end`` tells a complete block from a truncated one. In Lua 5.1::

      s:gsub("[^%w%-%._~/:=,@+]", function(c) return string.format("%%%02X", c:byte()) end)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import quote, unquote

from hpcstage.core.directives.model import OPTIONS, Kind, quoted
from hpcstage.core.directives.parse import check_text
from hpcstage.errors import DirectiveError

# admin_comment has no limit of its own in slurmctld, but accounting stores it in a TEXT column
# (64 KiB in MySQL); stay well inside.
MAX_ADMIN_COMMENT_CHARS = 32768
_ADMIN_MARK = re.compile(r"(?:^|(?<=\s))hpcstage:v([0-9]+):(\S*)")
_ADMIN_SAFE = "/:=,@+"  # quote() also keeps A-Z a-z 0-9 - . _ ~
# bad=<word>: a word of a #HPCSTAGE line that is no staging option, or a whole line with an
# open quote (job_submit.lua passes it on, so that the job is refused with it instead of
# running without that input).
_ADMIN_ITEM = re.compile(r"(in|out|bad)=((?:[A-Za-z0-9\-._~/:=,@+]|%[0-9A-Fa-f]{2})*)")
_ADMIN_KINDS: dict[str, Kind] = {"in": "stage-in", "out": "stage-out"}


def encode_admin_comment(directives: Sequence[str]) -> str:
    """Encode ``--stage-in=V``/``--stage-out=V`` strings as an admin_comment block."""
    items = []
    for directive in directives:
        name, equals, value = directive.partition("=")
        if name not in OPTIONS or not equals:
            raise DirectiveError(f"not a staging directive: {quoted(directive)}")
        check_text(value)  # refused later anyway; and quote() cannot encode lone surrogates
        items.append(f"{name.removeprefix('--stage-')}={quote(value, safe=_ADMIN_SAFE)}")
    comment = "hpcstage:v1:" + "".join(f"{item};" for item in items) + "end"
    if len(comment) > MAX_ADMIN_COMMENT_CHARS:
        raise DirectiveError(
            f"directives need {len(comment)} characters of admin_comment, "
            f"more than {MAX_ADMIN_COMMENT_CHARS}"
        )
    return comment


def decode_admin_comment(text: str) -> list[str] | None:
    """Directive strings from an admin_comment, or None if it holds no hpcstage block.

    A block that is ours but unreadable (newer version, truncated, bad escape, two blocks)
    raises DirectiveError: a job must not run as if it had no directives.
    """
    blocks = list(_ADMIN_MARK.finditer(text))
    if not blocks:
        return None
    if len(blocks) > 1:
        raise DirectiveError("admin_comment holds more than one hpcstage block")
    version, body = blocks[0].groups()
    if version != "1":
        raise DirectiveError(f"admin_comment uses hpcstage format v{version}; this reads v1")
    *items, last = body.split(";")
    if last != "end":
        raise DirectiveError("admin_comment hpcstage block is truncated (no final 'end')")
    return [_decode_item(item) for item in items]


def _decode_item(item: str) -> str:
    match = _ADMIN_ITEM.fullmatch(item)
    if match is None:
        raise DirectiveError(f"admin_comment hpcstage item {item[:60]!r} is malformed")
    try:
        value = unquote(match.group(2), errors="strict")
    except UnicodeDecodeError as err:
        raise DirectiveError("admin_comment hpcstage item is not UTF-8") from err
    if match.group(1) == "bad":
        # parse_args refuses it by name. Never as a directive: job_submit.lua before issue 15
        # passed a whole line with an open quote this way, and it may start --stage-in=.
        return f"#HPCSTAGE {value}" if value.partition("=")[0] in OPTIONS else value
    return f"--{_ADMIN_KINDS[match.group(1)]}={value}"
