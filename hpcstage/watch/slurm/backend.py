"""How hpcstage asks Slurm: a four-method protocol and its thin CLI implementation.

Every decision lives in the pure parsers (``hpcstage.watch.slurm.parse``); ``CliBackend`` only runs
commands and turns their failures (missing binary, non-zero exit, timeout) into SlurmError with
the cause kept and an excerpt of stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from hpcstage.errors import SlurmError
from hpcstage.watch.slurm.het import merge_het_jobs
from hpcstage.watch.slurm.model import NodeInfo, QueueSnapshot, StartEstimate
from hpcstage.watch.slurm.parse import (
    SqueueMemo,
    merge_planned,
    parse_nodes_json,
    parse_squeue_json,
    parse_squeue_start,
    parse_version_output,
    release_tuple,
)

# scontrol learnt --json in 23.02; before that, 22.05's sinfo --json lists nodes with NodeAddr.
_SCONTROL_JSON_SINCE = (23, 2)
# What scontrol prints when the caller may not read a job's script (22.05 and 24.11 reply
# ESLURM_USER_ID_MISSING), or when the job has none (salloc/srun jobs).
_NO_SCRIPT_MESSAGES = ("Invalid user id", "Access/permission denied", "Job script not specified")
# Environment variables that would silently filter or reformat what the commands print.
_FILTER_PREFIXES = ("SQUEUE_", "SINFO_", "SCONTROL_")


class SlurmBackend(Protocol):
    """What the daemon needs from Slurm.  Implementations raise SlurmError, nothing else."""

    async def snapshot(self) -> QueueSnapshot:
        """Every job in the queue, with planned nodes for pending jobs."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """Every node with the address the daemon reaches it at."""
        ...

    async def batch_script(self, job_id: int) -> str | None:
        """The job's batch script, or None when we may not read it or it has none."""
        ...

    async def version(self) -> str:
        """The Slurm release, e.g. ``"22.05.8"``."""
        ...


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str


class CliBackend:
    """SlurmBackend over the Slurm commands (squeue, scontrol, sinfo) found in ``bin_dir``.

    ``env`` entries are added to the daemon's environment; SQUEUE_*/SINFO_* filters inherited
    from it are dropped and SLURM_TIME_FORMAT is forced to ISO so the parsers read every time.
    """

    def __init__(
        self, bin_dir: str = "", env: Mapping[str, str] | None = None, timeout: float = 30
    ) -> None:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(_FILTER_PREFIXES)}
        self._env = {**inherited, **(env or {}), "SLURM_TIME_FORMAT": "standard"}
        self._bin_dir = bin_dir
        self._timeout = timeout
        self._version: str | None = None
        # The last snapshot's records and `squeue --start` lines: unchanged ones are not read.
        self._squeue = SqueueMemo()
        self._starts: dict[str, StartEstimate | None] = {}

    async def snapshot(self) -> QueueSnapshot:
        """``squeue --json --all --states=all``; on 22.05 also ``squeue --start`` for planned
        nodes. ``--states=all``: 24.11 applies squeue's default state filter to JSON output
        too, which leaves out jobs that have just ended (22.05 listed every job anyway).
        A heterogeneous job's components come as one record, the leader's (``het.py``)."""
        taken_at = time.time()
        text = await self._stdout("squeue", "--json", "--all", "--states=all")
        snapshot = parse_squeue_json(text, taken_at=taken_at, memo=self._squeue)
        if not snapshot.planned_nodes_known:
            # %A (not %i) prints array tasks and het job components as plain job ids,
            # matching the JSON's job_id.
            starts = await self._stdout(
                "squeue", "--start", "--all", "-h", "-o", "%A|%S|%Y", "--states=PENDING"
            )
            snapshot = merge_planned(snapshot, parse_squeue_start(starts, memo=self._starts))
        return merge_het_jobs(snapshot)

    async def nodes(self) -> list[NodeInfo]:
        """``scontrol --json show nodes`` (23.02+) or ``sinfo --json`` (22.05)."""
        if release_tuple(await self.version()) >= _SCONTROL_JSON_SINCE:
            text = await self._stdout("scontrol", "--json", "show", "nodes")
        else:
            text = await self._stdout("sinfo", "--json")
        return list(parse_nodes_json(text))

    async def batch_script(self, job_id: int) -> str | None:
        """``scontrol write batch_script JOBID -``; None when refused or scriptless."""
        result = await self._run("scontrol", "write", "batch_script", str(job_id), "-")
        if result.returncode == 0:
            return result.stdout
        if any(message in result.stderr for message in _NO_SCRIPT_MESSAGES):
            return None
        raise _failure(("scontrol", "write", "batch_script", str(job_id)), result)

    async def version(self) -> str:
        """``squeue --version``, asked once per backend."""
        if self._version is None:
            self._version = parse_version_output(await self._stdout("squeue", "--version"))
        return self._version

    async def _stdout(self, *argv: str) -> str:
        result = await self._run(*argv)
        if result.returncode != 0:
            raise _failure(argv, result)
        return result.stdout

    async def _run(self, *argv: str) -> _Result:
        program = os.path.join(self._bin_dir, argv[0]) if self._bin_dir else argv[0]
        try:
            process = await asyncio.create_subprocess_exec(
                program,
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                start_new_session=True,  # its own process group: a timeout kills wrappers' children
            )
        except OSError as err:
            raise SlurmError(f"cannot run {program}: {err.strerror or err}") from err
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError as timeout:
            raise SlurmError(f"{' '.join(argv)} timed out after {self._timeout:g} s") from timeout
        finally:
            await _reap(process)
        # Scripts keep undecodable bytes (the directive parser refuses them by line);
        # Slurm's own output is UTF-8 JSON or ASCII.
        errors = "surrogateescape" if argv[1:3] == ("write", "batch_script") else "replace"
        code = process.returncode if process.returncode is not None else -1
        return _Result(code, stdout.decode(errors=errors), stderr.decode(errors="replace"))


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill a command we stopped waiting for (timeout, cancellation), and its children."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def _failure(argv: tuple[str, ...], result: _Result) -> SlurmError:
    detail = " ".join(result.stderr.split())[:300] or "no message"
    return SlurmError(f"{' '.join(argv)} failed (exit {result.returncode}): {detail}")
