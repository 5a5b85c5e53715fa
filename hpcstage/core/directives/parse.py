"""Parsing directives: scripts (``#SBATCH``/``#HPCSTAGE`` lines split as sbatch does), option
lists, one option value (SRC, DEST and FLAGS, refusing anything that could leave
$HPCSTAGE_DIR), and sbatch's filename patterns in a stage-out DEST. The grammar is drawn in the
package docstring (``hpcstage/core/directives/__init__.py``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Literal, overload
from urllib.parse import unquote

from hpcstage.core.directives.model import (
    MAX_DIRECTIVES,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_VALUE_CHARS,
    NO_VAL,
    OPTIONS,
    Directive,
    DirectiveProblem,
    JobContext,
    Kind,
    ParsedDirectives,
    Source,
    SourceKind,
    StageIn,
    StageOut,
    When,
    quoted,
    shown,
)
from hpcstage.core.filters import checked_filter
from hpcstage.core.packed import SUFFIX, DatasetRef, is_dataset_key
from hpcstage.errors import DirectiveError, PackError

# sbatch still reads the deprecated #SLURM like #SBATCH (with a warning), so a SPANK option
# there reaches the plugin: read it too, or the two paths would disagree.
_MAGIC_WORDS = ("#SBATCH", "#SLURM", "#HPCSTAGE")
_C_SPACE = " \t\n\v\f\r"  # C's isspace(), which sbatch uses to split words
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PATTERN = re.compile(r"%([0-9]*)(.?)", re.DOTALL)
_WHEN_VALUES = frozenset(when.value for when in When)
_QUERY_NAMES = frozenset({"include", "exclude", "versionId"})
# S3 version ids are opaque: AWS's are URL-safe text, MinIO's and moto's UUIDs; "null" names
# the version an unversioned bucket wrote.
_VERSION_ID = re.compile(r"[A-Za-z0-9._~+=-]{1,1024}")
_KIND_WORDS = {
    SourceKind.S3_OBJECT: "one object",
    SourceKind.S3_PREFIX: "a prefix",
    SourceKind.S3_PACKED: "a packed dataset",
    SourceKind.PATH: "a path",
}
# DEST and FILTERS of a stage-in split at the first ':' that starts one of these.
_FILTER_START = re.compile(r":(?=(?:include|exclude)=)")
_FILTER_ITEM = re.compile(r",(?=(?:include|exclude)=)")


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
        if name in OPTIONS and equals:
            found.add(OPTIONS[name], value, 0, arg)
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
    """Parse a stage-in SRC on its own (``s3://...`` or an absolute path), with any query a
    stored source carries (``?include=GLOB&exclude=GLOB`` on a prefix, ``?versionId=V`` on an
    object: see ``Source.url``)."""
    check_text(text)
    scheme, rest = _split_scheme(text)
    if scheme is None:
        return _path_source(text)
    if scheme != "s3":
        raise DirectiveError(
            f"unsupported scheme {shown(scheme, 30)}:// (use s3:// or an absolute path)"
        )
    rest, query = _split_query(rest)
    source = _s3_source(rest, "SRC")
    if is_dataset_key(source.key):
        source = _packed_source(source)
    return _with_query(source, query) if query else source


def location(src: str) -> str:
    """A stored stage-in source without its filter or version (``s3://b/p/?include=*.nc`` ->
    ``s3://b/p/``): the place it reads, which the overlap check compares with outputs (a
    filter only narrows it: a job still waits for any unfinished output under the prefix)."""
    if "?" not in src:
        return src  # the tick's fast path: almost every source
    scheme, rest = _split_scheme(src)
    head, query = _split_query(rest) if scheme == "s3" else (rest, [])
    return f"s3://{head}" if query else src


def _split_query(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``BUCKET/KEY`` and the items of its query, if the text after its last '?' is one.

    A key may hold '?' of its own: the text after it is a query only if every item is a
    known ``name=value`` (so ``s3://b/what?.txt`` still names that key)."""
    head, mark, tail = text.rpartition("?")
    if not mark:
        return text, []
    items = [item.partition("=") for item in tail.split("&")]
    if not all(eq and name in _QUERY_NAMES for name, eq, _ in items):
        return text, []
    return head, [(name, _unquoted(name, value)) for name, _, value in items]


def _unquoted(name: str, value: str) -> str:
    try:
        text = unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise DirectiveError(f"{name}={quoted(value)} is not UTF-8 once %-decoded") from None
    try:
        check_text(text)  # '%00' must not bring back what the value itself may not hold
    except DirectiveError as err:
        raise DirectiveError(f"{name}={quoted(value)}: {err}") from None
    return text


def _with_query(source: Source, query: list[tuple[str, str]]) -> Source:
    include = tuple(value for name, value in query if name == "include")
    exclude = tuple(value for name, value in query if name == "exclude")
    versions = [value for name, value in query if name == "versionId"]
    with_filter = _filtered(source, include, exclude)
    return _pinned(with_filter, versions) if versions else with_filter


def _filtered(source: Source, include: tuple[str, ...], exclude: tuple[str, ...]) -> Source:
    """The source with these include/exclude globs (a prefix only; checked)."""
    if not include and not exclude:
        return source
    if source.kind is not SourceKind.S3_PREFIX:
        raise DirectiveError(
            f"include=/exclude= filter the objects under an s3:// prefix (ending in '/');"
            f" SRC {quoted(source.url)} is {_KIND_WORDS[source.kind]}"
        )
    found = checked_filter(source.filter.include + include, source.filter.exclude + exclude)
    return replace(source, filter=found)


def _pinned(source: Source, versions: list[str]) -> Source:
    """The source pinned to one S3 object version (``?versionId=``)."""
    if len(versions) > 1:
        raise DirectiveError("SRC names more than one versionId")
    if source.kind is not SourceKind.S3_OBJECT:
        raise DirectiveError(
            f"versionId pins one object; SRC {quoted(source.url)} is"
            f" {_KIND_WORDS[source.kind]} (a prefix has no version: name each object)"
        )
    if not _VERSION_ID.fullmatch(versions[0]):
        raise DirectiveError(f"versionId {quoted(versions[0])} is not an S3 version id")
    return replace(source, version_id=versions[0])


def policy_url(src: str) -> str:
    """The location the policy judges for a stored stage-in SRC (see Source.policy_url)."""
    return parse_source(src).policy_url


def _packed_source(source: Source) -> Source:
    """A source naming a packed dataset (a key component ending ``.hpack``), its key
    normalised to ``PREFIX.hpack[@N]/[SUBTREE/]``."""
    try:
        ref = DatasetRef.parse(source.key if source.key.endswith("/") else source.key + "/")
    except PackError as err:
        raise DirectiveError(str(err)) from None
    return Source(SourceKind.S3_PACKED, source.bucket, ref.key())


def expand_patterns(text: str, context: JobContext) -> str:
    """Expand sbatch's filename patterns: %j job id, %u user, %x job name, %A array master id
    (the job id outside arrays), %a array task id (4294967294 outside arrays, as sbatch prints),
    %N the node's name and %n its index in the job's nodes (left as written while the context
    has no node), %% a literal '%'.  A number after '%' zero-pads numeric values (``%3a`` ->
    007)."""
    return _PATTERN.sub(lambda match: _pattern_value(match, context), text)


def names_node(template: str) -> bool:
    """Whether a stage-out DEST holds %n or %N: it is written back from every node of the job,
    each under its own name (else from the batch host only)."""
    return any(m.group(2) in ("n", "N") for m in _PATTERN.finditer(template))


def expand_stage_out(stage_out: StageOut, context: JobContext) -> StageOut:
    """The stage-out with its destination's patterns expanded and checked again.

    A job name can hold anything (``..``, '/', control characters), so the expanded key is
    validated as if the user had written it, and must keep its kind (object vs prefix).
    """
    try:
        dest = _expanded(stage_out.dest, stage_out.pack, context)
    except DirectiveError as err:
        problem = DirectiveProblem(stage_out.line, stage_out.text, str(err))
        raise DirectiveError(str(problem)) from err
    return replace(stage_out, dest=dest)


def expand_dest_template(template: str, pack: bool, context: JobContext) -> str:
    """A stored stage-out DEST (``s3://bucket/key`` with %-patterns) expanded for ``context``
    (a job array's record, once it became a task), checked as at admission."""
    scheme, rest = _split_scheme(template)
    if scheme != "s3":
        raise DirectiveError(f"DEST {quoted(template)} is not an s3:// URL")
    return _expanded(_s3_source(rest, "DEST"), pack, context).url


def _expanded(dest: Source, pack: bool, context: JobContext) -> Source:
    key = expand_patterns(dest.key, context)
    check_text(key)
    found = _s3_source(f"{dest.bucket}/{key}", "DEST")
    if found.kind is not dest.kind:
        raise DirectiveError(f"expanded DEST {quoted(found.url)} changes from object to prefix")
    # A job name may hold '.hpack': it must not turn a loose stage-out into one inside a
    # dataset, nor move a packed one's dataset.
    check_packed_dest(found, pack)
    return found


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
        if name in OPTIONS and not equals:
            if index + 1 >= len(words):
                raise DirectiveError(f"{name} needs a value on the same line")
            index, value = index + 1, words[index + 1]
        elif name not in OPTIONS:
            if strict:
                raise DirectiveError(f"unknown #HPCSTAGE option {quoted(words[index])}")
            index += 1
            continue
        found.append((OPTIONS[name], value))
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
    check_text(value)
    if not value:
        raise DirectiveError(f"--{kind} needs a value")
    if kind == "stage-in":
        src, dest = _parse_stage_in(value)
        return StageIn(src, dest, line, text)
    src_path, dest_source, flags = _parse_stage_out(value)
    return StageOut(src_path, dest_source, flags.when, flags.optional, line, text, flags.pack)


def _parse_stage_in(value: str) -> tuple[Source, PurePosixPath]:
    scheme, rest = _split_scheme(value)
    if scheme is None and not value.startswith("/"):
        raise DirectiveError("SRC must be s3://BUCKET/KEY, s3://BUCKET/PREFIX/ or an absolute path")
    src_text, colon, after = (rest if scheme else value).partition(":")
    src = parse_source(f"{scheme}://{src_text}" if scheme else src_text)
    dest_text, filters = _split_filters(after)
    if filters:
        src = _filtered(src, *filters)
        if not dest_text:  # SRC::FILTERS keeps the default DEST
            return src, _default_dest(src)
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


def _split_filters(text: str) -> tuple[str, tuple[tuple[str, ...], tuple[str, ...]] | None]:
    """A stage-in's ``DEST[:FILTERS]``: DEST, and the include and exclude globs if any.

    FILTERS start at the first ':' followed by ``include=`` or ``exclude=`` and split at each
    ',' followed by one of them, so a DEST or a glob may hold ':' and ',' (a DEST cannot hold
    ':include=')."""
    if text.startswith(("include=", "exclude=")):
        raise DirectiveError(
            f"DEST {quoted(text)} looks like a filter: write SRC::{text.split(':')[0]} to keep"
            " the default DEST, or SRC:DEST:include=GLOB"
        )
    match = _FILTER_START.search(text)
    if match is None:
        return text, None
    include: list[str] = []
    exclude: list[str] = []
    for item in _FILTER_ITEM.split(text[match.end() :]):
        name, _, glob = item.partition("=")
        (include if name == "include" else exclude).append(glob)
    return text[: match.start()], (tuple(include), tuple(exclude))


def _parse_stage_out(value: str) -> tuple[PurePosixPath, Source, _Flags]:
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
    dest_text, colon, flag_text = after.partition(":")
    flags = _parse_flags(flag_text) if colon else _Flags()
    if flags.pack and dest_text.endswith(SUFFIX):
        dest_text += "/"  # the dataset itself: a prefix, written with or without the '/'
    dest = _s3_source(dest_text, "DEST")
    expand_patterns(dest.key, _PROBE)  # refuse unknown patterns now, not after the job
    check_packed_dest(dest, flags.pack)
    return src, dest, flags


@dataclass(frozen=True)
class _Flags:
    """A stage-out's FLAGS."""

    when: When = When.ALWAYS
    optional: bool = False
    pack: bool = False


def _parse_flags(text: str) -> _Flags:
    when, optional, pack, seen = When.ALWAYS, False, False, set()
    for flag in text.split(","):
        name, equals, value = flag.partition("=")
        if name in seen:
            raise DirectiveError(f"stage-out flag {quoted(name)} given twice")
        seen.add(name)
        if name == "on" and equals and value in _WHEN_VALUES:
            when = When(value)
        elif name == "optional" and not equals:
            optional = True
        elif name == "pack" and not equals:
            pack = True
        else:
            raise DirectiveError(
                f"unknown stage-out flag {quoted(flag)} "
                "(known: on=always|success|failure, optional, pack)"
            )
    return _Flags(when, optional, pack)


def check_packed_dest(dest: Source, pack: bool) -> None:
    """A ``pack`` stage-out's DEST is a packed dataset itself (``.../NAME.hpack/``, no @N, no
    subtree); any other DEST naming a dataset or something inside one is refused, so that no
    one writes loose objects into a dataset by mistake."""
    if not is_dataset_key(dest.key):
        if pack:
            raise DirectiveError(
                f"a packed stage-out DEST names a packed dataset, s3://BUCKET/PATH/NAME{SUFFIX}/"
                f" (not {quoted(dest.url)})"
            )
        return
    if not pack:
        raise DirectiveError(
            f"DEST {quoted(dest.url)} is inside a packed dataset ({SUFFIX}): add the flag"
            " ':pack' to write the outputs as a new version of it"
        )
    try:
        ref = DatasetRef.parse(dest.key)
    except PackError as err:
        raise DirectiveError(str(err)) from None
    if ref.version is not None:
        raise DirectiveError(
            f"a packed stage-out writes a new version: DEST {quoted(dest.url)} cannot pin"
            f" @{ref.version}"
        )
    if ref.subtree or dest.kind is not SourceKind.S3_PREFIX:
        raise DirectiveError(
            f"a packed stage-out DEST is the dataset itself, ending in '{SUFFIX}/' (not"
            f" {quoted(dest.url)})"
        )


# --- sources and paths ------------------------------------------------------------------------


def _split_scheme(text: str) -> tuple[str | None, str]:
    match = _SCHEME.match(text)
    return (match.group(1).lower(), text[match.end() :]) if match else (None, text)


def _s3_source(text: str, what: str) -> Source:
    """``BUCKET/KEY`` (after ``s3://``) -> an object or prefix Source."""
    bucket, slash, key = text.partition("/")
    if not slash:
        raise DirectiveError(f"{what} {quoted('s3://' + text)} needs /KEY or a trailing '/'")
    check_bucket(bucket)
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
    """SRC's last component (a prefix's last directory; the bucket for a whole bucket; a packed
    dataset's subtree's last directory, or the dataset's name without ``.hpack``)."""
    if src.kind is SourceKind.S3_PACKED:
        ref = DatasetRef.parse(src.key)
        top = ref.subtree.removesuffix("/") or ref.prefix.removesuffix("/").removesuffix(SUFFIX)
        return _dest_path(top.rsplit("/", 1)[-1])
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


def check_text(value: str) -> None:
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


def check_bucket(bucket: str) -> None:
    """AWS's general-purpose bucket naming rules (MinIO and Ceph accept a subset of these)."""
    if (
        not _BUCKET.fullmatch(bucket)
        or any(pair in bucket for pair in ("..", ".-", "-."))
        or _IPV4.fullmatch(bucket)
        or bucket.startswith(_BUCKET_PREFIXES)
        or bucket.endswith(_BUCKET_SUFFIXES)
    ):
        raise DirectiveError(f"{quoted(bucket)} is not a valid S3 bucket name")


# --- patterns --------------------------------------------------------------------------------

_PROBE = JobContext(job_id=1, user="user", name="name")


def _pattern_value(match: re.Match[str], context: JobContext) -> str:
    width_text, letter = match.groups()
    if len(width_text) > 2 or int(width_text or 0) > 10:
        raise DirectiveError(f"pattern width in {shown('%' + width_text + letter, 20)} is over 10")
    width = int(width_text or 0)
    if letter == "%" and not width_text:
        return "%"
    if letter in ("n", "N"):
        if context.node is None:
            return match.group(0)  # expanded per node when the job's outputs are written back
        if letter == "N":
            return context.node
    numbers = {
        "n": context.node_index,
        "j": context.job_id,
        "A": context.job_id if context.array_task_id is None else context.array_job_id,
        "a": NO_VAL if context.array_task_id is None else context.array_task_id,
    }
    if letter in numbers:
        return f"{numbers[letter] or 0:0{width}d}"
    if letter in ("u", "x"):
        return context.user if letter == "u" else context.name
    which = shown(f"%{width_text}{letter}", 20) if letter else "a trailing '%'"
    raise DirectiveError(f"unsupported pattern {which} (known: %j %u %x %A %a %n %N %%)")
