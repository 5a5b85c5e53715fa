"""``hpcstage pack --slurm``: submit the slices as a Slurm job array and the merge as a job that
starts when every task succeeded (``--dependency=afterok``). Slurm schedules, retries and
accounts for the work; this module only runs sbatch and scontrol (scripts: core.packing).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from hpcstage.core.packing import SlurmPack, sbatch_args
from hpcstage.errors import PackError

_ENDED_OK = "COMPLETED"
_ENDED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


@dataclass(frozen=True)
class Submitted:
    """The array's job id and the merge job's."""

    array: int
    merge: int


def submit(
    pack: SlurmPack,
    *,
    max_running: int,
    partition: str,
    name: str,
    log_dir: str,
    extra: tuple[str, ...] = (),
) -> Submitted:
    """Submit the array and the merge job; their ids."""
    array_args = sbatch_args(pack.tasks, max_running, partition, name, log_dir, extra)
    array = _sbatch(array_args, pack.task_script())
    merge_args = [a for a in array_args if not a.startswith(("--array=", "--output="))]
    merge_args += [
        f"--dependency=afterok:{array}",
        "--kill-on-invalid-dep=yes",
        f"--output={log_dir}/{name}-merge-%j.out",
    ]
    merge = _sbatch(merge_args, pack.merge_script())
    return Submitted(array, merge)


def _sbatch(args: list[str], script: str) -> int:
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackError(f"sbatch could not be run: {exc}") from exc
    if done.returncode != 0:
        raise PackError(f"sbatch refused the pack's job: {done.stderr.strip()}")
    return int(done.stdout.strip().split(";")[0])


def job_state(job: int) -> str:
    """The job's state as scontrol shows it ("" when Slurm no longer knows it)."""
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for token in done.stdout.split():
        key, _, value = token.partition("=")
        if key == "JobState":
            return value
    return ""


def wait(job: int, poll: float = 2.0) -> None:
    """Wait for the merge job to end; PackError unless it completed."""
    while True:
        state = job_state(job)
        if state in _ENDED or not state:
            break
        time.sleep(poll)
    if state and state != _ENDED_OK:
        why = (
            " (its dependency failed: a slice task did not complete)"
            if state == "CANCELLED"
            else ""
        )
        raise PackError(
            f"the pack's merge job {job} ended {state}{why}; see the jobs' logs, then run the"
            " same command again: finished segments are kept"
        )
