"""The directive model: what a ``--stage-in``/``--stage-out`` names, the limits on it, and how
problems with it are shown. Plain frozen dataclasses; the grammar is in ``parse.py`` and the
package docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import quote

from hpcstage.core.filters import KeyFilter
from hpcstage.core.packed import DatasetRef
from hpcstage.errors import DirectiveError

MAX_DIRECTIVES = 1000
MAX_VALUE_CHARS = 4096
MAX_KEY_BYTES = 1024  # S3's limit on object keys
MAX_NAME_BYTES = 255  # NAME_MAX: one path component on the node's filesystem
NO_VAL = 4294967294  # what sbatch prints for %a outside a job array

Kind = Literal["stage-in", "stage-out"]
OPTIONS: dict[str, Kind] = {"--stage-in": "stage-in", "--stage-out": "stage-out"}


class SourceKind(StrEnum):
    """What a source or destination names."""

    S3_OBJECT = "s3-object"
    S3_PREFIX = "s3-prefix"
    S3_PACKED = "s3-packed"  # a packed dataset, or a subtree of one (docs/packed-datasets.md)
    PATH = "path"


class When(StrEnum):
    """When a stage-out runs, by the job's outcome."""

    ALWAYS = "always"
    SUCCESS = "success"
    FAILURE = "failure"


# Characters a glob or version id keeps in a source's URL: none of ':' (SRC:DEST), '&' and
# '=' (the query), '%' or '?' (a key's own '?').
_QUERY_SAFE = "/*[]!^-._~"


@dataclass(frozen=True)
class Source:
    """An S3 object, an S3 prefix (key ends with '/', '' = whole bucket) or a shared path.

    A prefix may carry include/exclude globs (``filter``, core/filters.py), an object a
    pinned version (``version_id``, S3's VersionId; "" = the current version).
    """

    kind: SourceKind
    bucket: str = ""
    key: str = ""
    path: str = ""  # absolute, for kind PATH
    filter: KeyFilter = field(default_factory=KeyFilter)
    version_id: str = ""

    @property
    def url(self) -> str:
        """The source as stored and shown: ``s3://bucket/key`` or the path, then any filter or
        version as a query (``s3://b/p/?include=*.nc&exclude=tmp/**``, ``s3://b/k?versionId=V``),
        which ``parse_source`` reads back."""
        if self.kind is SourceKind.PATH:
            return self.path
        return f"s3://{self.bucket}/{self.key}{self.query}"

    @property
    def query(self) -> str:
        """``?include=...&exclude=...`` or ``?versionId=...``; "" without either."""
        items = [("include", glob) for glob in self.filter.include]
        items += [("exclude", glob) for glob in self.filter.exclude]
        if self.version_id:
            items.append(("versionId", self.version_id))
        text = "&".join(f"{name}={quote(value, safe=_QUERY_SAFE)}" for name, value in items)
        return f"?{text}" if text else ""

    @property
    def policy_url(self) -> str:
        """The location the site policy judges: ``url`` without filter or version (a filter
        only narrows a prefix; a version is the same key), and for a packed dataset its prefix
        and subtree without the version (``s3://b/lib/x.hpack/set1/`` for ``x.hpack@3/set1/``),
        so a grant on the dataset or on a directory inside it covers every version of it."""
        if self.kind is SourceKind.PATH:
            return self.path
        if self.kind is not SourceKind.S3_PACKED:
            return f"s3://{self.bucket}/{self.key}"
        ref = DatasetRef.parse(self.key)
        return f"s3://{self.bucket}/{ref.prefix}{ref.subtree}"


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
    pack: bool = False  # write SRC as a new version of the packed dataset DEST

    @property
    def dest_url(self) -> str:
        """The destination as written, patterns unexpanded."""
        return self.dest.url


Directive = StageIn | StageOut


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
    # The node a stage-out runs on (%N) and its place in the job's node list (%n); None
    # until then: the patterns stay as written and are expanded per node at stage-out.
    node: str | None = None
    node_index: int | None = None
