"""Staging directives: ``--stage-in`` / ``--stage-out`` from batch scripts and option values.

Grammar (each option may be repeated; a job has at most 1000 directives)::

    --stage-in=SRC[:DEST[:FILTERS]]     (SRC::FILTERS: the default DEST)
        SRC    s3://BUCKET/KEY        one object
               s3://BUCKET/KEY?versionId=V   that version of the object (S3 VersionId)
               s3://BUCKET/PREFIX/    every object under PREFIX (s3://BUCKET/ = whole bucket)
               /ABSOLUTE/PATH         a file or directory on a shared filesystem
               s3://BUCKET/P/NAME.hpack[@N]/[SUBTREE/]   a packed dataset (newest version, or
                                      version N), whole or one directory of it
                                      (docs/packed-datasets.md)
        DEST   a path relative to $HPCSTAGE_DIR; default: SRC's last component. DIR/ means
               "into DIR" as with cp: an object or a path without a final '/' lands as
               DIR/NAME, a prefix or a path written with a final '/' as DIR
        FILTERS  include=GLOB / exclude=GLOB, comma-separated, repeatable, on a prefix only:
               which objects under it are staged (``hpcstage.core.filters``: relative to the
               prefix, '*' within a component, '**' across; an exclude wins)
    --stage-out=SRC:DEST[:FLAGS]
        SRC    a path relative to $HPCSTAGE_DIR (file or directory), or "." for all of it
        DEST   s3://BUCKET/PREFIX/    SRC goes under PREFIX (a directory's contents, a file by name)
               s3://BUCKET/KEY        SRC must be a file
               s3://BUCKET/P/NAME.hpack/   with the flag pack: SRC is written as a new
                                      version of this packed dataset (no @N: the version is
                                      chosen at stage-out); a DEST naming a dataset or
                                      something inside one without pack is refused
               sbatch's filename patterns %j %u %x %A %a %n %N %% are expanded (expand_stage_out;
               %n %N per node, when the outputs are written back)
        FLAGS  comma list: on=always|success|failure (default always), optional (SRC may be
               missing), pack (docs/packed-datasets.md, "Packed stage-out")

Separators: SRC and DEST are split at the first ':' after any ``s3://``, DEST and FLAGS at the
next ':'.  So S3 keys and stage-in SRC paths cannot contain ':', a stage-in DEST can. A stage-in's
FILTERS start at the first ':' followed by ``include=``/``exclude=`` and split at each ','
followed by one (a glob may hold ':' and ','). A stored source carries its filters or version
as a query (``Source.url``: ``s3://b/p/?include=*.nc&exclude=tmp/**``), which ``parse_source``
reads back; a key's own '?' stays part of it unless every item after the last '?' is
``include=``, ``exclude=`` or ``versionId=``.

Where directives are read from:

- A batch script: ``#SBATCH`` (and its deprecated twin ``#SLURM``) and ``#HPCSTAGE`` lines of
  the leading comment block, exactly as
  sbatch scans it (it stops at the first line whose first non-blank character is not '#'), and
  split into words as sbatch does (quotes group, backslash escapes, an unquoted '#' ends the
  line).  ``#SBATCH`` lines may carry other options, which are ignored; ``#HPCSTAGE`` lines may
  carry only ours.  ``--stage-in=V`` and ``--stage-in V`` are both accepted.
- Option values (SPANK, ``hpcstage warmup``): ``parse_value``; lists of options: ``parse_args``.
- Slurm's ``admin_comment``, written by a job_submit.lua from the SPANK job environment as
  ``hpcstage:v1:in=<value>;out=<value>;...;end`` (the encoding is drawn in ``admin_comment.py``).

Every refusal names its line (``line 0`` is a value given outside a script).  Nothing parsed here
can name a path outside $HPCSTAGE_DIR: '..', '.', empty components and absolute DESTs are refused.

The package's modules: ``model.py`` (what a directive names, its limits, how problems are
shown), ``parse.py`` (scripts, option lists, one value, filename patterns) and
``admin_comment.py`` (the job_submit.lua bridge). Import from the package; everything here is
pure and uses only the standard library (``hpcstage env`` imports it).
"""

from hpcstage.core.directives.admin_comment import (
    MAX_ADMIN_COMMENT_CHARS,
    decode_admin_comment,
    encode_admin_comment,
)
from hpcstage.core.directives.model import (
    MAX_DIRECTIVES,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_VALUE_CHARS,
    NO_VAL,
    QUOTED_CHARS,
    SHOWN_CHARS,
    SHOWN_PROBLEMS,
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
    summarize,
)
from hpcstage.core.directives.parse import (
    check_bucket,
    expand_dest_template,
    expand_patterns,
    expand_stage_out,
    location,
    names_node,
    parse_args,
    parse_script,
    parse_source,
    parse_value,
    policy_url,
)

__all__ = [
    "MAX_ADMIN_COMMENT_CHARS",
    "MAX_DIRECTIVES",
    "MAX_KEY_BYTES",
    "MAX_NAME_BYTES",
    "MAX_VALUE_CHARS",
    "NO_VAL",
    "QUOTED_CHARS",
    "SHOWN_CHARS",
    "SHOWN_PROBLEMS",
    "Directive",
    "DirectiveProblem",
    "JobContext",
    "Kind",
    "ParsedDirectives",
    "Source",
    "SourceKind",
    "StageIn",
    "StageOut",
    "When",
    "check_bucket",
    "decode_admin_comment",
    "encode_admin_comment",
    "expand_dest_template",
    "expand_patterns",
    "expand_stage_out",
    "location",
    "names_node",
    "parse_args",
    "parse_script",
    "parse_source",
    "parse_value",
    "policy_url",
    "quoted",
    "shown",
    "summarize",
]
