"""The daemon's small rules about one staging attempt, as plain functions and records. Pure.

Standard library only: what a staging item is and how messages name its directive, how long a
node that failed waits before it is tried again, how progress reported by an agent becomes
database columns, and how refused directives and stored sources are rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hpcstage.core import directives as dirs
from hpcstage.core.limits import OutputLimit

# After a node's agent dies or cannot be reached, wait before trying it again: 2 s, 4 s, ...
# up to a minute. Five attempts thus ride out about a minute of a node being unreachable.
NODE_BACKOFF_BASE = 2.0
NODE_BACKOFF_MAX = 60.0


def reconnect_delay(failures: int) -> float:
    """Seconds to wait before trying a node again after ``failures`` (>= 1) in a row."""
    return float(min(NODE_BACKOFF_BASE * 2 ** min(failures - 1, 16), NODE_BACKOFF_MAX))


@dataclass(frozen=True)
class StagingItem:
    """One directive of one attempt: its staging row, its request, and how the user wrote it."""

    staging_id: int
    request_id: int
    src: str
    dest: str
    text: str
    line: int

    def where(self) -> str:
        """'line N: <directive>: ' for messages about this directive."""
        return (f"line {self.line}: " if self.line else "") + f"{self.text}: "


def remaining(items: Sequence[StagingItem], current: StagingItem | None) -> list[int]:
    """Staging ids of ``current`` and every item after it (those not finished yet)."""
    ids = [item.staging_id for item in items]
    if current is None or current.staging_id not in ids:
        return ids
    return ids[ids.index(current.staging_id) :]


@dataclass(frozen=True)
class OutputFlags:
    """What the agent needs to know about one stage-out directive beyond its paths."""

    user: str
    optional: bool  # the directive's ``optional`` flag: a missing source is no error
    job_completed: bool  # the job ended COMPLETED
    limit: OutputLimit  # files and bytes this directive may still send
    pack: bool = False  # the directive's ``pack`` flag: SRC becomes a packed dataset version
    writer: str = ""  # who writes it, recorded in the version (see packed_writer)


def packed_writer(job_key: str, submitted: float, position: int) -> str:
    """How a packed stage-out names its writer in the version it makes: the job (its id and
    submit time: Slurm may give the id to a later job, and a requeued job runs again with a
    new submit time) and the directive (its place among the job's stage-outs)."""
    return f"job {job_key}@{int(submitted)} out {position}"


@dataclass
class Progress:
    """Latest progress of one staging: written to the database at each tick, shown live by the
    API in between (``Daemon.live_progress``)."""

    files_done: int = 0
    bytes_done: int = 0
    files_total: int | None = None
    bytes_total: int | None = None
    fetched: int = 0


class Counts(Protocol):
    """What an agent's progress report (``hpcstage.protocol.messages.StageProgress`` or
    ``StageOutProgress``) tells of one staging."""

    @property
    def files_done(self) -> int: ...
    @property
    def bytes_done(self) -> int: ...
    @property
    def files_total(self) -> int | None: ...
    @property
    def bytes_total(self) -> int | None: ...
    @property
    def fetched(self) -> int: ...


def take(progress: Progress, data: Counts) -> None:
    """Set ``progress`` from one progress report (or final item) of an agent."""
    progress.files_done = data.files_done
    progress.bytes_done = data.bytes_done
    progress.files_total = data.files_total
    progress.bytes_total = data.bytes_total
    progress.fetched = data.fetched


def columns(progress: Progress) -> dict[str, int]:
    """The staging columns ``progress`` sets (totals only once the agent knows them)."""
    found = {
        "files_done": progress.files_done,
        "bytes_done": progress.bytes_done,
        "fetched_files": progress.fetched,
    }
    if progress.files_total is not None:
        found["files_total"] = progress.files_total
    if progress.bytes_total is not None:
        found["bytes_total"] = progress.bytes_total
    return found


def describe(problem: dirs.DirectiveProblem) -> str:
    """A refused directive for users: its line when known, its text, and why."""
    where = f"line {problem.line}: " if problem.line else ""
    return f"{where}{dirs.shown(problem.text)}: {problem.message}"
