"""``hpcstage pack``'s pure rules (docs/packed-datasets.md, "Packing"): where a pack in progress
keeps its work files, how the path-sorted listing is cut into slices and each slice's files into
segments, which files ``--update`` keeps, what the plan records, and the sbatch scripts of a
Slurm pack.

Every cut depends only on the listing and the plan's settings, never on how many processes or
array tasks do the work: a single process and a K-task array write the same segment names
holding the same bytes, and merge into the same manifest. A resumed pack recomputes the cuts
without fetching a byte and skips the segments whose part manifest exists.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from hpcstage.core.directives import Source, SourceKind, parse_source
from hpcstage.core.packed import (
    MAX_VERSION,
    SUFFIX,
    WORK,
    padded,
    segment_name,
    tar_header,
)
from hpcstage.core.units import format_size
from hpcstage.errors import DirectiveError, PackError

DEFAULT_SLICE_FILES = 250_000  # rows of the listing per slice: the unit of a Slurm array task
SEGMENT_MAX_FILES = 32_768  # a segment's rows are held in memory while it is built
MIN_SEGMENT_SIZE = 64 * 2**10
MAX_SKIPPED_NUMBERS = 100  # version numbers held by other writers skipped before giving up
PLAN = "plan.json"
LISTING = "listing.parquet"
PARTS = "parts/"

_PENDING = re.compile(r"(\d{8})/")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)


# -- work files ---------------------------------------------------------------------------------


def work_prefix(version: int) -> str:
    """``_pack/NNNNNNNN/``: the work files of a pack of ``version``, relative to the dataset."""
    if not 1 <= version <= MAX_VERSION:
        raise PackError(f"a version is a number from 1 to {MAX_VERSION}, not {version}")
    return f"{WORK}{version:08d}/"


def part_key(version: int, segment: str) -> str:
    """The part manifest of one segment: its rows, and the mark that the segment is done."""
    return f"{work_prefix(version)}{PARTS}{segment.removesuffix('.tar')}.parquet"


def segment_of_part(rel_key: str) -> str | None:
    """The segment a key under ``_pack/<v>/parts/`` marks done (None for anything else)."""
    name = rel_key.rsplit("/", 1)[-1]
    return name.removesuffix(".parquet") + ".tar" if name.endswith(".parquet") else None


def pending_version(rel_key: str) -> int | None:
    """The version whose pack in progress owns ``rel_key`` (a key under ``_pack/``)."""
    if not rel_key.startswith(WORK):
        return None
    match = _PENDING.match(rel_key[len(WORK) :])
    return int(match.group(1)) if match else None


# -- cuts -------------------------------------------------------------------------------------


def slice_ranges(rows: int, slice_files: int) -> list[range]:
    """The listing's rows cut into slices of ``slice_files`` rows (the last one shorter)."""
    if slice_files < 1:
        raise PackError("a slice holds at least one file")
    return [range(start, min(rows, start + slice_files)) for start in range(0, rows, slice_files)]


def task_slices(slices: int, task: int, tasks: int) -> range:
    """The slices array task ``task`` of ``tasks`` packs: every ``tasks``-th, so tasks stay
    busy however uneven the slices are."""
    if not 0 <= task < tasks:
        raise PackError(f"task {task} of {tasks} does not exist")
    return range(task, slices, tasks)


def member_bytes(path: str, size: int) -> int:
    """What one file adds to a tar segment: its header block(s) and its padded bytes."""
    return len(tar_header(path, size, 0, 0)) + padded(size)


class SegmentCutter:
    """Decides where one slice's segments end: a new segment starts before a file that would
    take the current one past ``segment_size`` bytes or ``max_files`` files (a file bigger
    than a segment gets one of its own)."""

    def __init__(self, segment_size: int, max_files: int = SEGMENT_MAX_FILES) -> None:
        self.segment_size = segment_size
        self.max_files = max_files
        self.seq = -1  # the current segment's place in the slice (-1: none started)
        self._bytes = 0
        self._files = 0

    def place(self, path: str, size: int) -> tuple[int, bool]:
        """The segment (its place in the slice) that takes the next file, and whether the file
        starts it."""
        cost = member_bytes(path, size)
        full = self._bytes + cost > self.segment_size or self._files >= self.max_files
        if self.seq < 0 or (self._files and full):
            self.seq, self._bytes, self._files = self.seq + 1, 0, 0
            started = True
        else:
            started = False
        self._bytes += cost
        self._files += 1
        return self.seq, started


def segment_names(
    version: int, slice_no: int, rows: Iterable[tuple[str, int]], segment_size: int, max_files: int
) -> Iterator[str]:
    """The names of the segments one slice's files to pack (``(path, size)``) go into."""
    cutter = SegmentCutter(segment_size, max_files)
    for path, size in rows:
        seq, started = cutter.place(path, size)
        if started:
            yield segment_name(version, slice_no, seq)


# -- --update ---------------------------------------------------------------------------------


def unchanged(size: int, etag: str, old_size: int, old_etag: str) -> bool:
    """A file listed again is kept in its old segment when its size and identity (S3 ETag, or
    mtime in ns) are what the parent version packed; an unknown identity is never unchanged."""
    return bool(etag) and etag == old_etag and size == old_size


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackPlan:
    """``_pack/<v>/plan.json``: what a pack in progress does, written once its listing is
    uploaded (a pending pack without one is planned again). Every step reads it: the array
    tasks and the merge find the listing, the cuts and the source in it."""

    version: int
    parent: int | None
    source: str  # a directory's absolute path or s3://bucket/prefix/
    files: int  # rows of the listing (the new version's files)
    to_pack: int  # rows whose bytes are packed (the rest stay in the parent's segments)
    bytes_to_pack: int
    dropped: int  # the parent's files no longer in the source (--update)
    skipped: int  # symlinks, devices, FIFOs, directory markers left out
    slice_files: int
    segment_size: int
    max_files: int
    created: str

    @property
    def slices(self) -> list[range]:
        return slice_ranges(self.files, self.slice_files)

    def to_json(self) -> str:
        return json.dumps({"plan": 1, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> PackPlan:
        try:
            doc: dict[str, Any] = json.loads(text)
            doc.pop("plan")
            plan = cls(**doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise PackError(f"{where}: not a pack plan ({exc})") from None
        if plan.slice_files < 1 or plan.segment_size < 1 or plan.max_files < 1:
            raise PackError(f"{where}: a pack plan with empty cuts")
        return plan


# -- settings ---------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``256M``, ``1GiB``, ``65536``: bytes (K, M, G, T are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise PackError(f"{text!r} is not a size (examples: 65536, 64K, 256M, 1GiB)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) * int(1024**power)


def check_segment_size(size: int) -> int:
    if size < MIN_SEGMENT_SIZE:
        raise PackError(f"a segment size is at least {MIN_SEGMENT_SIZE} bytes, not {size}")
    return size


# -- a Slurm pack -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmPack:
    """How ``hpcstage pack --slurm`` submits its steps: ``command`` runs hpcstage on a node
    (``python -m hpcstage`` of the same installation), ``options`` go to every step."""

    command: tuple[str, ...]
    dest: str
    tasks: int
    options: tuple[str, ...] = ()  # --config, --endpoint-url, --spool ... of the pack

    def task_script(self) -> str:
        """The array's script: each task packs its slices."""
        argv = [*self.command, "pack-step", "slices", self.dest, "--tasks", str(self.tasks)]
        line = shlex.join([*argv, *self.options]) + ' --task "$SLURM_ARRAY_TASK_ID"'
        return _script(line)

    def merge_script(self) -> str:
        """The last step's script: merge the slices' part manifests into the version."""
        return _script(shlex.join([*self.command, "pack-step", "merge", self.dest, *self.options]))


def _script(line: str) -> str:
    return f"#!/bin/bash\n# written by hpcstage pack --slurm\nset -eu\nexec {line}\n"


def sbatch_args(
    tasks: int, max_running: int, partition: str, name: str, log_dir: str, extra: Iterable[str]
) -> list[str]:
    """The array's sbatch options (the merge job's are the same minus ``--array``)."""
    array = f"0-{tasks - 1}" + (f"%{max_running}" if max_running else "")
    args = [f"--array={array}", f"--job-name={name}", f"--output={log_dir}/{name}-%A_%a.out"]
    if partition:
        args.append(f"--partition={partition}")
    return [*args, *extra]


# -- a pack the daemon runs -------------------------------------------------------------------

DAEMON_MAX_SEGMENT = 4 * 2**30  # a daemon pack builds each segment in its spool on the daemon host


SPOOL_MARGIN = 64 * 2**20  # the listing and manifests a pack keeps in its spool besides segments


def spool_need(segment_size: int, jobs: int) -> int:
    """The spool room a pack building ``jobs`` segments of ``segment_size`` at once needs."""
    return jobs * segment_size + SPOOL_MARGIN


def spool_refusal(free: int, segment_size: int, jobs: int) -> str:
    """Why a daemon pack cannot start with ``free`` bytes left in its spool's file system
    (after what other packs need), building ``jobs`` segments of ``segment_size`` at once;
    "" when it can."""
    need = spool_need(segment_size, jobs)
    if free >= need:
        return ""
    return (
        f"the daemon's spool (site.state_dir) has {format_size(max(free, 0))} free for it;"
        " this pack needs"
        f" {format_size(need)} ({jobs} segments of {format_size(segment_size)} at once):"
        " a smaller --segment-size, or ask the site's admins for room"
    )


@dataclass(frozen=True)
class PackRequest:
    """``hpcstage pack --daemon SRC DEST``: what a user asks the daemon to pack (POST body)."""

    src: str  # s3://bucket/prefix/
    dest: str  # s3://bucket/.../NAME.hpack/
    update: bool = False
    segment_size: str = "256M"
    verify: bool = False

    def check(self) -> None:
        """DirectiveError unless SRC is an S3 prefix and DEST an S3 packed dataset (whole,
        no version, no subtree), apart from each other, with a sane segment size."""
        src = _parsed("src", self.src)
        if src.kind is not SourceKind.S3_PREFIX or src.url != self.src:
            raise DirectiveError(f"src {self.src!r}: expected an S3 prefix, s3://bucket/prefix/")
        dest = _parsed("dest", self.dest)
        whole = f"s3://{dest.bucket}/{dest.key}"
        if dest.kind is not SourceKind.S3_PACKED or "@" in dest.key or dest.url != self.dest:
            raise DirectiveError(f"dest {self.dest!r}: expected s3://bucket/.../NAME{SUFFIX}/")
        if not whole.endswith(SUFFIX + "/"):
            raise DirectiveError(f"dest {self.dest!r}: name the dataset, not a directory in it")
        if self.dest.startswith(self.src) or self.src.startswith(self.dest):
            raise DirectiveError(f"dest {self.dest} and src {self.src} must not hold each other")
        try:
            size = check_segment_size(parse_size(self.segment_size))
        except PackError as exc:
            raise DirectiveError(f"segment_size: {exc}") from None
        if size > DAEMON_MAX_SEGMENT:
            raise DirectiveError(
                f"segment_size {self.segment_size}: at most {DAEMON_MAX_SEGMENT // 2**30} GiB"
                " for a pack the daemon runs"
            )

    def options(self) -> dict[str, Any]:
        return {"update": self.update, "segment_size": self.segment_size, "verify": self.verify}


def _parsed(field: str, url: str) -> Source:
    try:
        return parse_source(url)
    except DirectiveError as exc:
        raise DirectiveError(f"{field}: {exc}") from None


@dataclass(frozen=True)
class PackUpdate:
    """One JSON line of ``hpcstage pack --json``: progress, or the final summary."""

    event: str  # progress | done | submitted | merged
    progress: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


PROGRESS_FIELDS = frozenset(
    {
        "files_total",
        "bytes_total",
        "files",
        "bytes",
        "segments",
        "segments_skipped",
        "phase",
        "listed",
    }
)


def parse_pack_line(line: bytes | str) -> PackUpdate | None:
    """Decode one line of ``hpcstage pack --json``; None when it is not one of its messages."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        return None
    if doc["event"] == "progress":
        fields = {k: v for k, v in doc.items() if k in PROGRESS_FIELDS}
        return PackUpdate("progress", progress=fields)
    body = {k: v for k, v in doc.items() if k != "event"}
    return PackUpdate(doc["event"], summary=body)


def packs_to_start(
    queued: Iterable[tuple[int, str]], running: Iterable[str], room: int
) -> list[int]:
    """Which queued daemon packs (``(id, user)``) to start in ``room`` free slots, given the
    users of the running ones: the oldest pack of a user with none running first, so one
    user's long packs never hold every slot while another's wait; then the oldest."""
    waiting = sorted(queued)
    busy = set(running)
    chosen: list[int] = []
    while waiting and len(chosen) < room:
        pick = next((p for p in waiting if p[1] not in busy), waiting[0])
        waiting.remove(pick)
        chosen.append(pick[0])
        busy.add(pick[1])
    return chosen
