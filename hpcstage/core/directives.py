"""Staging directives: ``--stage-in`` / ``--stage-out`` from batch scripts and option values.

Grammar (each option may be repeated; a job has at most 1000 directives)::

    --stage-in=SRC[:DEST]
        SRC    s3://BUCKET/KEY        one object
               s3://BUCKET/PREFIX/    every object under PREFIX (s3://BUCKET/ = whole bucket)
               /ABSOLUTE/PATH         a file or directory on a shared filesystem
        DEST   a path relative to $HPCSTAGE_DIR; default: SRC's last component. DIR/ means
               "into DIR" as with cp: an object or a path without a final '/' lands as
               DIR/NAME, a prefix or a path written with a final '/' as DIR
    --stage-out=SRC:DEST[:FLAGS]
        SRC    a path relative to $HPCSTAGE_DIR (file or directory), or "." for all of it
        DEST   s3://BUCKET/PREFIX/    SRC goes under PREFIX (a directory's contents, a file by name)
               s3://BUCKET/KEY        SRC must be a file
               sbatch's filename patterns %j %u %x %A %a %% are expanded (expand_stage_out)
        FLAGS  comma list: on=always|success|failure (default always), optional (SRC may be
               missing)

Separators: SRC and DEST are split at the first ':' after any ``s3://``, DEST and FLAGS at the
next ':'.  So S3 keys and stage-in SRC paths cannot contain ':', a stage-in DEST can.

Where directives are read from:

- A batch script: ``#SBATCH`` (and its deprecated twin ``#SLURM``) and ``#HPCSTAGE`` lines of
  the leading comment block, exactly as
  sbatch scans it (it stops at the first line whose first non-blank character is not '#'), and
  split into words as sbatch does (quotes group, backslash escapes, an unquoted '#' ends the
  line).  ``#SBATCH`` lines may carry other options, which are ignored; ``#HPCSTAGE`` lines may
  carry only ours.  ``--stage-in=V`` and ``--stage-in V`` are both accepted.
- Option values (SPANK, ``hpcstage warmup``): ``parse_value``; lists of options: ``parse_args``.
- Slurm's ``admin_comment``, written by a job_submit.lua from the SPANK job environment::

      hpcstage:v1:in=<value>;out=<value>;...;end

  Each value is percent-encoded (UTF-8) except ``A-Z a-z 0-9 - . _ ~ / : = , @ +``, so the block
  has no spaces or ';' of its own and other text may surround it (separated by whitespace).  The
  final ``end`` tells a complete block from a truncated one.  In Lua 5.1::

      s:gsub("[^%w%-%._~/:=,@+]", function(c) return string.format("%%%02X", c:byte()) end)

Every refusal names its line (``line 0`` is a value given outside a script).  Nothing parsed here
can name a path outside $HPCSTAGE_DIR: '..', '.', empty components and absolute DESTs are refused.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Literal, overload
from urllib.parse import quote, unquote

from hpcstage.errors import DirectiveError

MAX_DIRECTIVES = 1000
MAX_VALUE_CHARS = 4096
MAX_KEY_BYTES = 1024  # S3's limit on object keys
MAX_NAME_BYTES = 255  # NAME_MAX: one path component on the node's filesystem
# admin_comment has no limit of its own in slurmctld, but accounting stores it in a TEXT column
# (64 KiB in MySQL); stay well inside.
MAX_ADMIN_COMMENT_CHARS = 32768
NO_VAL = 4294967294  # what sbatch prints for %a outside a job array

Kind = Literal["stage-in", "stage-out"]
# sbatch still reads the deprecated #SLURM like #SBATCH (with a warning), so a SPANK option
# there reaches the plugin: read it too, or the two paths would disagree.
_MAGIC_WORDS = ("#SBATCH", "#SLURM", "#HPCSTAGE")
_OPTIONS: dict[str, Kind] = {"--stage-in": "stage-in", "--stage-out": "stage-out"}
_C_SPACE = " \t\n\v\f\r"  # C's isspace(), which sbatch uses to split words
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PATTERN = re.compile(r"%([0-9]*)(.?)", re.DOTALL)
_ADMIN_MARK = re.compile(r"(?:^|(?<=\s))hpcstage:v([0-9]+):(\S*)")
_ADMIN_SAFE = "/:=,@+"  # quote() also keeps A-Z a-z 0-9 - . _ ~
# bad=<word>: a word of a #HPCSTAGE line that is no staging option, or a whole line with an
# open quote (job_submit.lua passes it on, so that the job is refused with it instead of
# running without that input).
_ADMIN_ITEM = re.compile(r"(in|out|bad)=((?:[A-Za-z0-9\-._~/:=,@+]|%[0-9A-Fa-f]{2})*)")
_ADMIN_KINDS: dict[str, Kind] = {"in": "stage-in", "out": "stage-out"}


class SourceKind(StrEnum):
    """What a source or destination names."""

    S3_OBJECT = "s3-object"
    S3_PREFIX = "s3-prefix"
    PATH = "path"


class When(StrEnum):
    """When a stage-out runs, by the job's outcome."""

    ALWAYS = "always"
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class Source:
    """An S3 object, an S3 prefix (key ends with '/', '' = whole bucket) or a shared path."""

    kind: SourceKind
    bucket: str = ""
    key: str = ""
    path: str = ""  # absolute, for kind PATH

    @property
    def url(self) -> str:
        """The source as written in a directive: ``s3://bucket/key`` or the path."""
        return self.path if self.kind is SourceKind.PATH else f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class StageIn:
    """Copy ``src`` to ``$HPCSTAGE_DIR/dest`` before the job runs."""

    src: Source
    dest: PurePosixPath
    line: int
    text: str


@dataclass(frozen=True)
class StageOut:
    """Copy ``$HPCSTAGE_DIR/src`` to ``dest`` after the job, if ``when`` matches its outcome."""

    src: PurePosixPath
    dest: Source  # may hold unexpanded %-patterns: see expand_stage_out
    when: When
    optional: bool
    line: int
    text: str

    @property
    def dest_url(self) -> str:
        """The destination as written, patterns unexpanded."""
        return self.dest.url


Directive = StageIn | StageOut
_WHEN_VALUES = frozenset(when.value for when in When)


SHOWN_CHARS = 200  # of a directive's text in a message
SHOWN_PROBLEMS = 5


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """Text for a message: control characters escaped, cut to ``limit`` characters."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else f"{safe[:limit]}... ({len(text)} characters)"


QUOTED_CHARS = 60  # of one piece of a value quoted inside a message


def quoted(text: str, limit: int = QUOTED_CHARS) -> str:
    """``repr`` of a piece of a value for a message, cut: a 4 KiB value (the most a directive
    may hold) must not make a 4 KiB message; the reason follows it, so it stays readable."""
    text_repr = repr(text)  # escapes every non-printable character
    return text_repr if len(text_repr) <= limit else f"{text_repr[: limit - 4]}...'"


def summarize(problems: list[str]) -> str:
    """The first few problems, then how many more: 10,000 bad lines make one short message."""
    head = "; ".join(problems[:SHOWN_PROBLEMS])
    rest = len(problems) - SHOWN_PROBLEMS
    return head + (f"; and {rest} more" if rest > 0 else "")


@dataclass(frozen=True)
class DirectiveProblem:
    """One refused directive: where it was and why."""

    line: int
    text: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}: {shown(self.text)}"


@dataclass(frozen=True)
class ParsedDirectives:
    """Everything found in one script or option list.

    ``errors`` lists every refused directive; a job with any error must not be staged.
    ``warnings`` lists directives sbatch would not read (after the first command).
    """

    stage_in: tuple[StageIn, ...] = ()
    stage_out: tuple[StageOut, ...] = ()
    errors: tuple[DirectiveProblem, ...] = ()
    warnings: tuple[DirectiveProblem, ...] = ()

    def raise_if_errors(self) -> None:
        """Raise one DirectiveError listing every problem, if there is any."""
        if self.errors:
            raise DirectiveError(summarize([str(problem) for problem in self.errors]))


@dataclass(frozen=True)
class JobContext:
    """The job facts sbatch's filename patterns refer to."""

    job_id: int
    user: str
    name: str
    array_job_id: int | None = None
    array_task_id: int | None = None


# --- public entry points ------------------------------------------------------------------


_AFTER_COMMAND = "ignored: sbatch reads no directive after a command"


def parse_script(text: str) -> ParsedDirectives:
    """Parse a batch script's ``#SBATCH``/``#HPCSTAGE`` directives, collecting every error."""
    found = _Collector()
    for number, magic, rest, in_header in _magic_lines(text):
        line = f"{magic}{rest}".strip()
        try:
            options = _options(_split_words(rest), strict=magic == "#HPCSTAGE")
        except DirectiveError as err:
            if in_header:
                found.problem(number, line, str(err))
            else:  # not read at all, broken or not (e.g. a line of a heredoc)
                found.warn(number, line, _AFTER_COMMAND)
            continue
        for kind, value in options:
            if in_header:
                found.add(kind, value, number, line)
            else:
                found.warn(number, line, _AFTER_COMMAND)
    return found.result()


def parse_args(args: Iterable[str]) -> ParsedDirectives:
    """Parse ``--stage-in=V``/``--stage-out=V`` strings (e.g. from decode_admin_comment)."""
    found = _Collector()
    for arg in args:
        name, equals, value = arg.partition("=")
        if name in _OPTIONS and equals:
            found.add(_OPTIONS[name], value, 0, arg)
        else:
            found.problem(0, arg, "expected --stage-in=VALUE or --stage-out=VALUE")
    return found.result()


@overload
def parse_value(kind: Literal["stage-in"], value: str, line: int = 0) -> StageIn: ...
@overload
def parse_value(kind: Literal["stage-out"], value: str, line: int = 0) -> StageOut: ...
def parse_value(kind: Kind, value: str, line: int = 0) -> Directive:
    """Parse one option value; raise DirectiveError naming the line (0: not from a script)."""
    try:
        return _parse_directive(kind, value, line, f"--{kind}={value}")
    except DirectiveError as err:
        raise DirectiveError(str(DirectiveProblem(line, f"--{kind}={value}", str(err)))) from err


def parse_source(text: str) -> Source:
    """Parse a stage-in SRC on its own (``s3://...`` or an absolute path)."""
    _check_text(text)
    scheme, rest = _split_scheme(text)
    if scheme is None:
        return _path_source(text)
    if scheme != "s3":
        raise DirectiveError(
            f"unsupported scheme {shown(scheme, 30)}:// (use s3:// or an absolute path)"
        )
    return _s3_source(rest, "SRC")


def expand_patterns(text: str, context: JobContext) -> str:
    """Expand sbatch's filename patterns: %j job id, %u user, %x job name, %A array master id
    (the job id outside arrays), %a array task id (4294967294 outside arrays, as sbatch prints),
    %% a literal '%'.  A number after '%' zero-pads numeric values (``%3a`` -> 007)."""
    return _PATTERN.sub(lambda match: _pattern_value(match, context), text)


def expand_stage_out(stage_out: StageOut, context: JobContext) -> StageOut:
    """The stage-out with its destination's patterns expanded and checked again.

    A job name can hold anything (``..``, '/', control characters), so the expanded key is
    validated as if the user had written it, and must keep its kind (object vs prefix).
    """
    key = expand_patterns(stage_out.dest.key, context)
    try:
        _check_text(key)
        dest = _s3_source(f"{stage_out.dest.bucket}/{key}", "DEST")
        if dest.kind is not stage_out.dest.kind:
            raise DirectiveError(f"expanded DEST {quoted(dest.url)} changes from object to prefix")
    except DirectiveError as err:
        problem = DirectiveProblem(stage_out.line, stage_out.text, str(err))
        raise DirectiveError(str(problem)) from err
    return replace(stage_out, dest=dest)


def encode_admin_comment(directives: Sequence[str]) -> str:
    """Encode ``--stage-in=V``/``--stage-out=V`` strings as an admin_comment block."""
    items = []
    for directive in directives:
        name, equals, value = directive.partition("=")
        if name not in _OPTIONS or not equals:
            raise DirectiveError(f"not a staging directive: {quoted(directive)}")
        _check_text(value)  # refused later anyway; and quote() cannot encode lone surrogates
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


# --- scripts: finding and splitting directive lines ---------------------------------------


def _magic_lines(text: str) -> Iterator[tuple[int, str, str, bool]]:
    """(line number, magic word, rest, still in the header) for each directive line."""
    in_header = True
    for number, line in enumerate(text.split("\n"), 1):
        magic = next((word for word in _MAGIC_WORDS if line.startswith(word)), None)
        if magic is not None:
            # sbatch matches the bare prefix too ("#SBATCH--x"); so do we.
            yield number, magic, line[len(magic) :], in_header
        elif not line.lstrip(_C_SPACE).startswith("#") and line.strip(_C_SPACE):
            in_header = False


def _split_words(rest: str) -> list[str]:
    """Split a directive line into words the way sbatch's get_argument() does."""
    words: list[str] = []
    word: list[str] = []
    in_word, quote_char = False, ""
    chars = iter(rest)
    for char in chars:
        if quote_char and char == quote_char:
            quote_char = ""
        elif quote_char:
            word.append(char)
        elif char in _C_SPACE:
            if in_word:
                words.append("".join(word))
            word, in_word = [], False
        elif char == "#":
            break  # an unquoted '#' starts a comment
        else:
            in_word = True
            if char in "\"'":
                quote_char = char
            else:  # a backslash makes the next character literal
                word.append(next(chars, "") if char == "\\" else char)
    if quote_char:
        raise DirectiveError(f"unmatched {quote_char} quote")
    return [*words, "".join(word)] if in_word else words


def _options(words: list[str], strict: bool) -> list[tuple[Kind, str]]:
    """Pick our options out of a line's words; ``strict`` refuses any other word."""
    found: list[tuple[Kind, str]] = []
    index = 0
    while index < len(words):
        name, equals, value = words[index].partition("=")
        if name in _OPTIONS and not equals:
            if index + 1 >= len(words):
                raise DirectiveError(f"{name} needs a value on the same line")
            index, value = index + 1, words[index + 1]
        elif name not in _OPTIONS:
            if strict:
                raise DirectiveError(f"unknown #HPCSTAGE option {quoted(words[index])}")
            index += 1
            continue
        found.append((_OPTIONS[name], value))
        index += 1
    return found


# --- collecting -----------------------------------------------------------------------------


@dataclass
class _Collector:
    """Accumulates directives and problems, and checks what spans directives."""

    stage_in: list[StageIn] = field(default_factory=list)
    stage_out: list[StageOut] = field(default_factory=list)
    errors: list[DirectiveProblem] = field(default_factory=list)
    warnings: list[DirectiveProblem] = field(default_factory=list)
    dests: dict[PurePosixPath, int] = field(default_factory=dict)
    seen: int = 0

    def add(self, kind: Kind, value: str, line: int, text: str) -> None:
        self.seen += 1
        if self.seen == MAX_DIRECTIVES + 1:
            self.problem(line, text, f"more than {MAX_DIRECTIVES} directives in one job")
        if self.seen > MAX_DIRECTIVES:
            return
        try:
            directive = _parse_directive(kind, value, line, text)
        except DirectiveError as err:
            self.problem(line, text, str(err))
            return
        if isinstance(directive, StageOut):
            self.stage_out.append(directive)
        elif directive.dest in self.dests:
            first = self.dests[directive.dest]
            self.problem(
                line, text, f"DEST {quoted(str(directive.dest))} already used on line {first}"
            )
        else:
            self.dests[directive.dest] = line
            self.stage_in.append(directive)

    def problem(self, line: int, text: str, message: str) -> None:
        self.errors.append(DirectiveProblem(line, text, message))

    def warn(self, line: int, text: str, message: str) -> None:
        self.warnings.append(DirectiveProblem(line, text, message))

    def result(self) -> ParsedDirectives:
        return ParsedDirectives(
            tuple(self.stage_in), tuple(self.stage_out), tuple(self.errors), tuple(self.warnings)
        )


# --- one directive ----------------------------------------------------------------------------


def _parse_directive(kind: Kind, value: str, line: int, text: str) -> Directive:
    _check_text(value)
    if not value:
        raise DirectiveError(f"--{kind} needs a value")
    if kind == "stage-in":
        src, dest = _parse_stage_in(value)
        return StageIn(src, dest, line, text)
    src_path, dest_source, when, optional = _parse_stage_out(value)
    return StageOut(src_path, dest_source, when, optional, line, text)


def _parse_stage_in(value: str) -> tuple[Source, PurePosixPath]:
    scheme, rest = _split_scheme(value)
    if scheme is None and not value.startswith("/"):
        raise DirectiveError("SRC must be s3://BUCKET/KEY, s3://BUCKET/PREFIX/ or an absolute path")
    src_text, colon, dest_text = (rest if scheme else value).partition(":")
    src = parse_source(f"{scheme}://{src_text}" if scheme else src_text)
    if colon and dest_text.endswith("/") and dest_text != "/":
        # "DIR/" means "into DIR", as with cp: a prefix (and a path written with a final
        # '/') lands as DIR, an object as DIR/NAME, and so does a path written without one,
        # which may be a file (whether it is one is known only on the node).
        folder = _dest_path(dest_text.removesuffix("/"))
        if src.kind is SourceKind.S3_OBJECT or (
            src.kind is SourceKind.PATH and not src_text.endswith("/")
        ):
            return src, folder / _default_dest(src)
        return src, folder
    return src, _dest_path(dest_text) if colon else _default_dest(src)


def _parse_stage_out(value: str) -> tuple[PurePosixPath, Source, When, bool]:
    src_text, colon, rest = value.partition(":")
    if not colon:
        raise DirectiveError("stage-out needs SRC:DEST")
    src = PurePosixPath(".") if src_text == "." else _relative_path(src_text, "SRC")
    scheme, after = _split_scheme(rest)
    if scheme is None:
        raise DirectiveError("stage-out DEST must be s3://BUCKET/PREFIX/ or s3://BUCKET/KEY")
    if scheme != "s3":
        raise DirectiveError(
            f"unsupported scheme {shown(scheme, 30)}:// (stage-out writes to s3://)"
        )
    dest_text, colon, flags = after.partition(":")
    dest = _s3_source(dest_text, "DEST")
    expand_patterns(dest.key, _PROBE)  # refuse unknown patterns now, not after the job
    when, optional = _parse_flags(flags) if colon else (When.ALWAYS, False)
    return src, dest, when, optional


def _parse_flags(text: str) -> tuple[When, bool]:
    when, optional, seen = When.ALWAYS, False, set()
    for flag in text.split(","):
        name, equals, value = flag.partition("=")
        if name in seen:
            raise DirectiveError(f"stage-out flag {quoted(name)} given twice")
        seen.add(name)
        if name == "on" and equals and value in _WHEN_VALUES:
            when = When(value)
        elif name == "optional" and not equals:
            optional = True
        else:
            raise DirectiveError(
                f"unknown stage-out flag {quoted(flag)} "
                "(known: on=always|success|failure, optional)"
            )
    return when, optional


# --- sources and paths ------------------------------------------------------------------------


def _split_scheme(text: str) -> tuple[str | None, str]:
    match = _SCHEME.match(text)
    return (match.group(1).lower(), text[match.end() :]) if match else (None, text)


def _s3_source(text: str, what: str) -> Source:
    """``BUCKET/KEY`` (after ``s3://``) -> an object or prefix Source."""
    bucket, slash, key = text.partition("/")
    if not slash:
        raise DirectiveError(f"{what} {quoted('s3://' + text)} needs /KEY or a trailing '/'")
    _check_bucket(bucket)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise DirectiveError(f"{what} key is longer than {MAX_KEY_BYTES} bytes")
    if key == "":
        return Source(SourceKind.S3_PREFIX, bucket, "")
    _check_components(key.removesuffix("/"), f"{what} key")
    kind = SourceKind.S3_PREFIX if key.endswith("/") else SourceKind.S3_OBJECT
    return Source(kind, bucket, key)


def _path_source(text: str) -> Source:
    if not text.startswith("/"):
        raise DirectiveError(f"SRC path {quoted(text)} must be absolute")
    body = text[1:].removesuffix("/")
    if not body:
        raise DirectiveError("SRC cannot be the root directory")
    _check_components(body, "SRC path")
    return Source(SourceKind.PATH, path="/" + body)


def _default_dest(src: Source) -> PurePosixPath:
    """SRC's last component (a prefix's last directory; the bucket for a whole bucket)."""
    name = (src.path or src.key.removesuffix("/") or src.bucket).rsplit("/", 1)[-1]
    return _dest_path(name)


def _dest_path(text: str) -> PurePosixPath:
    if text.endswith("/") and text != "/":
        raise DirectiveError(f"DEST {quoted(text)} must not end with '/'")
    return _relative_path(text, "DEST")


def _relative_path(text: str, what: str) -> PurePosixPath:
    """A path that stays inside $HPCSTAGE_DIR: relative, no '', '.' or '..' component."""
    if not text:
        raise DirectiveError(f"{what} is empty")
    if text.startswith("/"):
        raise DirectiveError(f"{what} {quoted(text)} must be relative to $HPCSTAGE_DIR")
    _check_components(text, what)
    too_long = next((part for part in text.split("/") if len(part.encode()) > MAX_NAME_BYTES), "")
    if too_long:
        raise DirectiveError(
            f"{what} component {too_long[:40]!r}... is over {MAX_NAME_BYTES} bytes"
        )
    # Checked before PurePosixPath, which would silently fold 'a//b' and 'a/./b'.
    return PurePosixPath(text)


def _check_components(path: str, what: str) -> None:
    for part in path.split("/"):
        if part in ("", ".", ".."):
            which = "an empty" if not part else f"a {part!r}"
            raise DirectiveError(f"{what} {quoted(path)} has {which} component")


def _check_text(value: str) -> None:
    if len(value) > MAX_VALUE_CHARS:
        raise DirectiveError(f"value is longer than {MAX_VALUE_CHARS} characters")
    # Cc: NUL and other control characters; Cs: lone surrogates from undecodable bytes.
    bad = next((char for char in value if unicodedata.category(char) in ("Cc", "Cs")), None)
    if bad is not None:
        raise DirectiveError(f"control character {bad!r} in value")


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3")


def _check_bucket(bucket: str) -> None:
    """AWS's general-purpose bucket naming rules (MinIO and Ceph accept a subset of these)."""
    if (
        not _BUCKET.fullmatch(bucket)
        or any(pair in bucket for pair in ("..", ".-", "-."))
        or _IPV4.fullmatch(bucket)
        or bucket.startswith(_BUCKET_PREFIXES)
        or bucket.endswith(_BUCKET_SUFFIXES)
    ):
        raise DirectiveError(f"{quoted(bucket)} is not a valid S3 bucket name")


# --- patterns and admin_comment ---------------------------------------------------------------

_PROBE = JobContext(job_id=1, user="user", name="name")


def _pattern_value(match: re.Match[str], context: JobContext) -> str:
    width_text, letter = match.groups()
    if len(width_text) > 2 or int(width_text or 0) > 10:
        raise DirectiveError(f"pattern width in {shown('%' + width_text + letter, 20)} is over 10")
    width = int(width_text or 0)
    if letter == "%" and not width_text:
        return "%"
    numbers = {
        "j": context.job_id,
        "A": context.job_id if context.array_task_id is None else context.array_job_id,
        "a": NO_VAL if context.array_task_id is None else context.array_task_id,
    }
    if letter in numbers:
        return f"{numbers[letter] or 0:0{width}d}"
    if letter in ("u", "x"):
        return context.user if letter == "u" else context.name
    which = shown(f"%{width_text}{letter}", 20) if letter else "a trailing '%'"
    raise DirectiveError(f"unsupported pattern {which} (known: %j %u %x %A %a %%)")


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
        return f"#HPCSTAGE {value}" if value.partition("=")[0] in _OPTIONS else value
    return f"--{_ADMIN_KINDS[match.group(1)]}={value}"
