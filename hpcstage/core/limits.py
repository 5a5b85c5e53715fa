"""Limits on what one job or one user can make the service do (``[limits]``). Pure.

Without them a job could list a prefix of 10^7 zero-byte objects (byte quotas never stop it,
the node runs out of inodes), stage out 10^7 files (as many tasks and rows) or a sparse
100 TiB file, and a user could request warmups as fast as the API answers. Each decision
here names the limit that applies, so that messages tell the user which key the site set.
0 in a setting means no limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from hpcstage.core.units import format_size
from hpcstage.errors import LimitError

if TYPE_CHECKING:  # the node agent imports this module, and not pydantic with it
    from hpcstage.config.schema import LimitSettings

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectBudget:
    """At most ``max_objects`` more objects for one stage-in (None: no limit), and why."""

    max_objects: int | None
    reason: str


def stage_in_budget(limits: LimitSettings, objects_so_far: int) -> ObjectBudget:
    """What the job's next stage-in may list, after its earlier ones staged ``objects_so_far``."""
    limit = limits.stage_in_objects
    if not limit:
        return ObjectBudget(None, "")
    reason = f"the per-job limit limits.stage_in_objects is {limit:,}"
    if objects_so_far:
        reason += f" and the job's earlier stage-ins hold {objects_so_far:,}"
    return ObjectBudget(max(limit - objects_so_far, 0), reason)


def too_many_objects(max_objects: int, reason: str) -> LimitError:
    """The error of a stage-in that lists more than ``max_objects`` objects."""
    return LimitError(
        f"too many objects: this stage-in lists more than {max_objects:,} objects and {reason}"
        " (stage a narrower prefix, or ask the site to raise the limit)"
    )


def warmup_refusal(limits: LimitSettings, in_flight: int, last_minute: int) -> str:
    """Why a user with ``in_flight`` unfinished warmups, ``last_minute`` of them requested in
    the last minute, may not request another ('' when they may)."""
    most = limits.warmups_in_flight
    if most and in_flight >= most:
        return (
            f"you have {in_flight} warmups in progress and limits.warmups_in_flight is {most}:"
            " wait for one to finish"
        )
    rate = limits.warmups_per_minute
    if rate and last_minute >= rate:
        return (
            f"you requested {last_minute} warmups in the last minute and"
            f" limits.warmups_per_minute is {rate}: try again in a minute"
        )
    return ""


def cache_request_refusal(limits: LimitSettings, busy: bool, last_minute: int) -> str:
    """Why a user may not ask for another ``warmup --check`` or ``cache evict SRC`` ('' when
    they may): one of theirs is still running (each lists all of SRC in the daemon), or they
    asked ``last_minute`` of them in the last minute."""
    if busy:
        return "your previous cache check or evict is still running: wait for it to finish"
    rate = limits.cache_requests_per_minute
    if rate and last_minute >= rate:
        return (
            f"you asked {last_minute} cache checks or evicts in the last minute and"
            f" limits.cache_requests_per_minute is {rate}: try again in a minute"
        )
    return ""


def pack_refusal(limits: LimitSettings, in_flight: int) -> str:
    """Why a user with ``in_flight`` unfinished daemon packs may not ask for another ('' when
    they may)."""
    most = limits.packs_in_flight
    if most and in_flight >= most:
        return (
            f"you have {in_flight} packs in progress and limits.packs_in_flight is {most}:"
            " wait for one to finish"
        )
    return ""


@dataclass(frozen=True)
class OutputLimit:
    """At most ``max_files`` files and ``max_bytes`` bytes for one stage-out (None: no
    limit), and why, for messages."""

    max_files: int | None
    max_bytes: int | None
    reason: str

    def bounded(self, outputs: Iterable[T], size: Callable[[T], int]) -> Iterator[T]:
        """``outputs`` as they come, raising LimitError at the first one over a limit (a walk
        of 10^7 files stops there, before anything is uploaded or held in memory)."""
        files = total = 0
        for output in outputs:
            files, total = files + 1, total + size(output)
            if self.max_files is not None and files > self.max_files:
                raise LimitError(
                    f"too many outputs: more than {self.max_files:,} files and {self.reason}"
                )
            if self.max_bytes is not None and total > self.max_bytes:
                raise LimitError(
                    f"outputs too large: more than {self.max_bytes:,} bytes"
                    f" ({format_size(self.max_bytes)}) and {self.reason}"
                )
            yield output


def stage_out_limit(limits: LimitSettings, files_so_far: int, bytes_so_far: int) -> OutputLimit:
    """What the job's next stage-out may hold after its earlier ones held the rest."""
    files, size = limits.stage_out_files, limits.stage_out_bytes
    reason = (
        f"the per-job limits are limits.stage_out_files = {files:,},"
        f" limits.stage_out_bytes = {format_size(size)} (0: none)"
    )
    if files_so_far or bytes_so_far:
        reason += (
            f"; the job's earlier stage-outs hold {files_so_far:,} files,"
            f" {format_size(bytes_so_far)}"
        )
    return OutputLimit(
        max(files - files_so_far, 0) if files else None,
        max(size - bytes_so_far, 0) if size else None,
        reason,
    )
