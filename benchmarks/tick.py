#!/usr/bin/env python3
"""The overlap check of one daemon tick: the pairwise comparison before hpcstage.core.overlap, and
the index, on J running jobs with I stage-ins and O unfinished stage-outs each.

Each tick the daemon asks, for every unreleased job, whether one of its stage-ins overlaps an
unfinished output of another job. This script builds that state as plain strings (what
``Daemon.tick`` hands the check after reading the database; the database read itself is
not measured) and times:

- ``new``: building ``overlap.OutputIndex`` from all J*O outputs and answering every job, in
  full;
- ``old``: the pairwise loop of 4f7f2a1 (``daemon._waits_for``), copied below. At 1,000 jobs it
  would take hours, so it runs on ``--old-jobs`` jobs' first ``--old-inputs`` inputs against
  all outputs, and the full tick is extrapolated from the time per comparison (the loop does
  the same work for every pair when nothing overlaps, which is the common case).

Two layouts: ``disjoint`` (every job reads its own inputs and writes its own results: nothing
overlaps, the pairwise loop compares everything), and ``pipeline`` (job j reads the results
prefix job j-1 writes, so every job but the first waits; the pairwise loop stops at the first
hit, after scanning on average half of the outputs).

``--views N`` also writes N such jobs (one staging per request) into a scratch SQLite state
database and times ``tickview.read_views``, the whole per-tick read the planner needs, of which the
overlap check is one part.

    .venv/bin/python benchmarks/tick.py                       # 1,000 x 500 x 500
    .venv/bin/python benchmarks/tick.py --jobs 50 --old-jobs 50   # the issue's 50-job case
    .venv/bin/python benchmarks/tick.py --views 50            # + the database read, 50 jobs
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

from hpcstage.core.overlap import OutputIndex, overlaps, waits_for


def old_waits_for(inputs: list[str], me: str, outputs: list[tuple[str, str]]) -> str:
    """daemon._waits_for as of 4f7f2a1, on plain strings."""
    for src in inputs:
        for dest, other in outputs:
            if other != me and overlaps(src, dest):
                return other
    return ""


def state(
    jobs: int, inputs: int, outputs: int, layout: str
) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(inputs per job, (output, job) pairs) of ``jobs`` running jobs."""
    ins: dict[str, list[str]] = {}
    outs: list[tuple[str, str]] = []
    for j in range(jobs):
        key = str(1_000_000 + j)
        if layout == "pipeline" and j:
            reads = [f"s3://results/run/{1_000_000 + j - 1}/"]
            reads += [f"s3://data/project{j % 20}/set{j}/part{i:05d}.h5" for i in range(1, inputs)]
        else:
            reads = [f"s3://data/project{j % 20}/set{j}/part{i:05d}.h5" for i in range(inputs)]
        ins[key] = reads
        # Half files, half prefixes (a directory staged out): both kinds of stage-out.
        outs += [
            (f"s3://results/run/{key}/out{k:05d}" + ("/" if k % 2 else ".nc"), key)
            for k in range(outputs)
        ]
    return ins, outs


def run_new(ins: dict[str, list[str]], outs: list[tuple[str, str]]) -> tuple[float, float, int]:
    """(seconds to build the index, seconds to answer every job, jobs that wait)."""
    t0 = time.perf_counter()
    index = OutputIndex(outs)
    t1 = time.perf_counter()
    waiting = sum(1 for key, reads in ins.items() if waits_for(reads, key, index))
    return t1 - t0, time.perf_counter() - t1, waiting


def pairs_compared(reads: list[str], me: str, outs: list[tuple[str, str]]) -> int:
    """How many pairs the pairwise loop compares for one job (it stops at the first hit)."""
    compared = 0
    for src in reads:
        for dest, other in outs:
            compared += 1
            if other != me and overlaps(src, dest):
                return compared
    return compared


def run_old_sample(
    ins: dict[str, list[str]], outs: list[tuple[str, str]], jobs: int, inputs: int
) -> tuple[float, int]:
    """(seconds, pairs compared) of the pairwise loop on a sample of jobs and inputs."""
    sample = [(key, reads[:inputs]) for key, reads in list(ins.items())[-jobs:]]
    t0 = time.perf_counter()
    for key, reads in sample:
        old_waits_for(reads, key, outs)
    seconds = time.perf_counter() - t0
    return seconds, sum(pairs_compared(reads, key, outs) for key, reads in sample)


def old_tick_pairs(jobs: int, inputs: int, outputs: int, layout: str) -> int:
    """Pairs the pairwise loop compares in one tick of ``state(...)``, in closed form."""
    every = jobs * outputs
    if layout == "disjoint":
        return jobs * inputs * every
    # Job 0 reads nothing anyone writes: all its pairs. Job j (>= 1) hits on its first input
    # at job j-1's first output, after the (j-1)*outputs outputs listed before.
    return inputs * every + sum((j - 1) * outputs + 1 for j in range(1, jobs))


def time_views(jobs: int, inputs: int, outputs: int) -> float:
    """Seconds ``tickview.read_views`` (the read of each tick) takes over ``jobs`` running
    jobs in a SQLite state."""
    from sqlalchemy import insert

    from hpcstage.db import Job, Request, Staging, open_db
    from hpcstage.watch import tickview

    where = tempfile.mkdtemp(prefix="hpcstage-tick-")
    db = open_db(f"sqlite:///{where}/state.db")
    ins, outs = state(jobs, inputs, outputs, "disjoint")
    requests: list[dict[str, object]] = []
    for j, reads in enumerate(ins.values()):
        requests += [
            {"job_id": j + 1, "direction": "in", "position": i, "src": src, "dest": f"in/{i}"}
            for i, src in enumerate(reads)
        ]
    key_to_job = {key: j + 1 for j, key in enumerate(ins)}
    requests += [
        {"job_id": key_to_job[key], "direction": "out", "position": 0, "src": "out", "dest": d}
        for d, key in outs
    ]
    with db.begin() as session:
        session.execute(
            insert(Job),
            [
                {"id": j + 1, "slurm_job_id": int(key), "state": "RUNNING", "nodes": "n1"}
                | {"started_at": 1.0, "user": "u"}
                for j, key in enumerate(ins)
            ],
        )
        for i, row in enumerate(requests, 1):
            row["id"] = i
        session.execute(insert(Request), requests)
        session.execute(
            insert(Staging),
            [{"request_id": r["id"], "node": "n1", "state": "queued"} for r in requests],
        )
    t0 = time.perf_counter()
    with db.begin() as session:
        list(tickview.read_views(session))
    return time.perf_counter() - t0


def human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--outputs", type=int, default=500)
    parser.add_argument("--old-jobs", type=int, default=1, help="jobs the pairwise loop checks")
    parser.add_argument("--old-inputs", type=int, default=20, help="of each, this many inputs")
    parser.add_argument("--views", type=int, default=0, help="jobs for the database read")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.node()}")
    print(f"{args.jobs} jobs x {args.inputs} stage-ins x {args.outputs} unfinished stage-outs")
    for layout in ("disjoint", "pipeline"):
        ins, outs = state(args.jobs, args.inputs, args.outputs, layout)
        build, answer, waiting = run_new(ins, outs)
        print(f"[{layout}] {waiting} jobs wait")
        print(
            f"  new: index of {len(outs):,} outputs built in {human(build)},"
            f" every job answered in {human(answer)}: {human(build + answer)} per tick"
        )
        n_jobs, n_inputs = min(args.old_jobs, args.jobs), min(args.old_inputs, args.inputs)
        seconds, compared = run_old_sample(ins, outs, n_jobs, n_inputs)
        per_pair = seconds / compared
        total = old_tick_pairs(args.jobs, args.inputs, args.outputs, layout)
        print(
            f"  old: {compared:,} pairs in {human(seconds)} ({per_pair * 1e9:.0f} ns a pair);"
            f" a tick compares {total:,.0f} pairs: about {human(total * per_pair)}"
        )

    if args.views:
        seconds = time_views(args.views, args.inputs, args.outputs)
        print(
            f"tickview.read_views over {args.views} jobs x {args.inputs} x {args.outputs}"
            f" in SQLite: {human(seconds)}"
        )


if __name__ == "__main__":
    main()
