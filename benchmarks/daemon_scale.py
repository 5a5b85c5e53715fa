#!/usr/bin/env python3
"""The daemon's tick at a large queue: CPU time and peak RSS, the cluster faked at its edges.

A queue of N jobs (5/6 pending, 1/6 running; about a tenth of the jobs pending and planned on
a node by the backfill scheduler), each with five ``#HPCSTAGE --stage-in`` lines in its batch
script, is printed as ``squeue --json`` would print it, shaped as a recorded job of Slurm 22.05
(openapi/v0.0.38, with ``squeue --start`` for planned nodes) or 24.11 (data_parser/v0.0.42):
each record is the job of tests/golden/ with its fields set. The daemon runs its real tick
(``Daemon.tick``: CliBackend parsing, fold, admission, tickview, planner, executor) on a real
state database; only the edges are in-process fakes: the Slurm commands (``CliBackend._run``
answers from memory instead of starting squeue/scontrol) and the node agents (each accepts a
stage and keeps it running, as a busy cluster's agents would during a tick).

Measured per tick, in a fresh process per (size, shape, database): ``time.process_time()``
of the tick, and the process's peak RSS after the admission and at the end (a 1,000-job run
is mostly the imports):

- ``first``: every job is new (read its script, admit, audit, insert), admitted in slices
  of ``fold.ADMIT_PER_SYNC`` jobs, one a tick, on the same snapshot: the CPU of them all,
  their number, and the longest (how long the event loop is held at once);
- ``same``: nothing changed since the last tick (the median of ``--repeat`` ticks);
- ``1%``: 1% of the jobs changed (pending -> running, running -> completed, a new plan).

    .venv/bin/python benchmarks/daemon_scale.py --sizes 1000,10000,50000
    .venv/bin/python benchmarks/daemon_scale.py --sizes 12000 --shapes 24.11 --profile /tmp/t
    .venv/bin/python benchmarks/daemon_scale.py --postgres   # also PostgreSQL (127.0.0.1:5432)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import cProfile
import dataclasses
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcstage.config.load import parse_config
from hpcstage.db import open_db
from hpcstage.errors import SlurmError
from hpcstage.protocol.framing import RpcClient
from hpcstage.service.daemon import Daemon
from hpcstage.staging.executor import Executor
from hpcstage.store.credentials import CredentialSource
from hpcstage.watch import fold
from hpcstage.watch.slurm import backend as slurm_backend

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NODES = 500  # compute nodes n0000..n0499
INPUTS = 5
EPOCH = 1_795_000_000  # submit times (slurmctld's clock)


@dataclass
class SimJob:
    """One job of the simulated queue."""

    job_id: int
    state: str  # PENDING | RUNNING | COMPLETED
    node: str  # allocated (running) or planned (pending, every tenth); "" otherwise
    priority: int
    user: str


def queue(size: int, seed: int = 1) -> list[SimJob]:
    """``size`` jobs, a sixth of them running, every tenth pending one planned on a node."""
    rng = random.Random(seed)  # noqa: S311 - not crypto
    jobs = []
    for i in range(size):
        running = i % 6 == 0
        planned = not running and i % 10 == 1
        node = f"n{rng.randrange(NODES):04d}" if running or planned else ""
        state = "RUNNING" if running else "PENDING"
        jobs.append(SimJob(1000 + i, state, node, rng.randrange(1, 10**6), f"user{i % 50}"))
    return jobs


def change(jobs: list[SimJob], fraction: float, rng: random.Random) -> None:
    """Change ``fraction`` of the jobs: a third start, a third end, a third are (re)planned."""
    for n, job in enumerate(rng.sample(jobs, int(len(jobs) * fraction))):
        if n % 3 == 0 and job.state == "PENDING":
            job.state, job.node = "RUNNING", job.node or f"n{rng.randrange(NODES):04d}"
        elif n % 3 == 1 and job.state == "RUNNING":
            job.state = "COMPLETED"
        elif job.state == "PENDING":
            job.node = f"n{rng.randrange(NODES):04d}"
        else:
            job.priority += 1


def script(job_id: int) -> str:
    """The batch script of a job: five stage-in directives."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name=sim{job_id}"]
    lines += [
        f"#HPCSTAGE --stage-in=s3://data/project{job_id % 40}/set{job_id}/part{k}.h5:in/p{k}.h5"
        for k in range(INPUTS)
    ]
    return "\n".join([*lines, "srun ./analyse in/", ""])


# --- squeue --json in the two recorded shapes ------------------------------------------------


def _template(shape: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document without jobs, one job record) recorded from Slurm ``shape``."""
    name = {"22.05": "slurm-22.05", "24.11": "slurm-24.11-recorded"}[shape]
    doc = json.loads((GOLDEN / name / "squeue.json").read_text())
    record = doc["jobs"][0]
    doc["jobs"] = []
    return doc, record


def _number(value: int) -> dict[str, Any]:
    return {"set": True, "infinite": False, "number": value}


def squeue_json(shape: str, jobs: list[SimJob]) -> bytes:
    """What ``squeue --json --all --states=all`` writes for ``jobs`` (24.11 indents it).

    Built one record at a time and as bytes: building it then needs about what the daemon's tick
    holds at once anyway (the command's output as bytes, and decoded), not a tree of every
    record, so the peak RSS measured is the daemon's."""
    doc, template = _template(shape)
    new = shape == "24.11"
    indent = 2 if new else None
    doc["jobs"] = "JOBS"
    head, tail = json.dumps(doc, indent=indent).encode().split(b'"JOBS"')
    parts = [head, b"["]  # joined once: the parts and the whole are all it holds
    for job in jobs:
        record = copy.deepcopy(template)
        running = job.state != "PENDING"
        submit, start = EPOCH + job.job_id, EPOCH + job.job_id + (60 if running else 7200)
        times = {"submit_time": submit, "start_time": start, "end_time": start + 3600}
        record.update(
            job_id=job.job_id,
            name=f"sim{job.job_id}",
            user_name=job.user,
            account="lab",
            partition="batch",
            batch_host=job.node if running else "",
            nodes=job.node if running else "",
            state_reason="None" if running else "Priority",
            command=f"/home/{job.user}/job-{job.job_id}.sh",
        )
        if new:
            record.update({k: _number(v) for k, v in times.items()})
            record["job_state"] = [job.state]
            record["priority"] = _number(job.priority)
            record["scheduled_nodes"] = job.node if job.state == "PENDING" else ""
        else:
            record.update(times)
            record["job_state"] = job.state
            record["priority"] = job.priority
        parts += [b","] if len(parts) > 2 else []
        parts.append(json.dumps(record, indent=indent).encode())
    return b"".join([*parts, b"]", tail])


def squeue_start(jobs: list[SimJob]) -> str:
    """``squeue --start -h -o %A|%S|%Y --states=PENDING`` (22.05's planned nodes)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(EPOCH + 7200))
    return "".join(
        f"{j.job_id}|{when}|{j.node or '(null)'}\n" for j in jobs if j.state == "PENDING"
    )


class FakeSlurm(slurm_backend.CliBackend):
    """The real CliBackend with its commands answered from memory (no squeue process)."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape
        self.squeue = b""
        self.start = ""
        self.scripts_read = 0

    def show(self, jobs: list[SimJob]) -> None:
        """What the commands print from now on (built outside the measured tick)."""
        self.squeue = b""  # the last one gone first, as the last command's output would be
        self.squeue = squeue_json(self.shape, jobs)
        self.start = squeue_start(jobs)

    async def _run(self, *argv: str) -> slurm_backend._Result:
        if argv[:2] == ("squeue", "--json"):
            return slurm_backend._Result(0, self.squeue.decode(), "")  # as CliBackend._run
        if argv[:2] == ("squeue", "--start"):
            return slurm_backend._Result(0, self.start, "")
        if argv[:2] == ("squeue", "--version"):
            return slurm_backend._Result(0, f"slurm {self.shape}.5\n", "")
        if argv[:3] == ("scontrol", "write", "batch_script"):
            self.scripts_read += 1
            return slurm_backend._Result(0, script(int(argv[3])), "")
        raise SlurmError(f"the fake Slurm does not know {argv}")


# --- the agents --------------------------------------------------------------------------


class BusyAgent:
    """An agent that accepts every call and keeps it running (a transfer in progress)."""

    def __init__(self, node: str, never: asyncio.Event) -> None:
        self.name = node
        self.never = never

    async def call(self, op: str, params: dict[str, Any], on_progress: Any = None) -> Any:
        await self.never.wait()


class BusyNodes:
    """``staging.nodes.NodePool`` over busy agents."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def agent(self, node: str) -> RpcClient:
        return BusyAgent(node, self.never)  # type: ignore[return-value]

    def node_failed(self, node: str) -> None:
        raise AssertionError(node)

    def backing_off(self, node: str) -> bool:
        return False

    def known_nodes(self) -> list[str]:
        return [f"n{i:04d}" for i in range(NODES)]

    def powered_down(self, node: str) -> bool:
        return False

    def peer_address(self, node: str) -> str:
        return "127.0.0.1"


def daemon(state: Path, url: str, backend: FakeSlurm) -> Daemon:
    """A daemon on ``url`` wired as at start-up, but with busy fake agents."""
    settings = parse_config(
        f'[site]\nname = "bench"\nstate_dir = "{state}"\nstate_url = "{url}"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n[policy]\ndefault = "allow"\n'
    )
    found = Daemon(settings, backend=backend, db=open_db(settings.site.state_url))
    assert found.db is not None
    wired = found._wire(found.db, backend, CredentialSource(None))
    executor = Executor(settings, found.db, BusyNodes(), found.wake, found.bins.store)
    found._parts = dataclasses.replace(wired, executor=executor)
    return found


@contextlib.contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new database on the PostgreSQL of ``POSTGRES`` (dropped after): its URL."""
    from sqlalchemy import create_engine, text

    name = f"hpcstage_scale_{os.getpid()}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


# --- one run (a child process) -------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _tick(found: Daemon, profile: cProfile.Profile | None, reuse: bool = False) -> float:
    """CPU seconds of one tick; then the started actions get to run (not measured)."""
    if profile is not None:
        profile.enable()
    t0 = time.process_time()
    await found.tick(reuse_snapshot=reuse)
    spent = time.process_time() - t0
    if profile is not None:
        profile.disable()
    for _ in range(3):
        await asyncio.sleep(0)
    return spent


async def run(size: int, shape: str, db: str, repeat: int, profile_to: str) -> dict[str, Any]:
    """Measure one (size, shape, database); the result as a JSON-able dict."""
    profiles = {k: cProfile.Profile() if profile_to else None for k in ("first", "same", "1pc")}
    backend = FakeSlurm(shape)
    jobs = queue(size)
    rng = random.Random(2)  # noqa: S311 - not crypto
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hpcstage-scale-"))
        url = f"sqlite:///{tmp}/state.db"
        if db == "postgres":
            url = stack.enter_context(scratch_postgres())
        found = daemon(Path(tmp), url, backend)
        backend.show(jobs)
        # The whole queue is new: admitted in slices (fold.ADMIT_PER_SYNC jobs a tick), the
        # later ones on the same snapshot, as the daemon's main loop does.
        slices = [await _tick(found, profiles["first"])]
        while found.admitting:
            slices.append(await _tick(found, profiles["first"], reuse=True))
        first_rss = peak_rss_mib()
        scripts = backend.scripts_read
        same = [await _tick(found, profiles["same"]) for _ in range(repeat)]
        changed = []
        for _ in range(repeat):
            change(jobs, 0.01, rng)
            backend.show(jobs)
            changed.append(await _tick(found, profiles["1pc"]))
        inflight = len(found.parts.executor.tasks)
        await found.parts.executor.cancel()
        assert found.db is not None
        found.db.kw["bind"].dispose()
    for kind, profile in profiles.items():
        if profile is not None:
            profile.dump_stats(f"{profile_to}.{kind}")
    return {
        "size": size,
        "shape": shape,
        "db": db,
        "first": sum(slices),
        "slices": len(slices),
        "longest_slice": max(slices),
        "same": statistics.median(same),
        "changed": statistics.median(changed),
        "first_rss_mib": first_rss,
        "peak_rss_mib": peak_rss_mib(),
        "scripts_read": scripts,
        "stages_running": inflight,
    }


# --- the driver ----------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| jobs | Slurm JSON | database | admitting the queue: CPU (ticks) | its longest tick"
        " | unchanged tick CPU | 1% changed tick CPU | peak RSS after admission | peak RSS |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['size']:,} | {r['shape']} | {r['db']} | {r['first']:.2f} s ({r['slices']})"
            f" | {r['longest_slice']:.2f} s"
            f" | {r['same']:.3f} s | {r['changed']:.3f} s"
            f" | {r['first_rss_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="jobs in the queue")
    parser.add_argument("--shapes", default="22.05,24.11", help="squeue JSON shapes")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also PostgreSQL (a scratch database on 127.0.0.1:5432)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="steady ticks of each kind")
    parser.add_argument(
        "--slice",
        type=int,
        default=fold.ADMIT_PER_SYNC,
        help="new jobs admitted a tick (default: the daemon's, %(default)s)",
    )
    parser.add_argument(
        "--profile", default="", help="cProfile into FILE.first, FILE.same, FILE.1pc"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # size,shape,db: run in this process
    args = parser.parse_args()
    if args.one:
        size, shape, db = args.one.split(",")
        fold.ADMIT_PER_SYNC = args.slice
        result = asyncio.run(run(int(size), shape, db, args.repeat, args.profile))
        print(json.dumps(result))
        return
    dbs = ["sqlite", "postgres"] if args.postgres else ["sqlite"]
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for shape in args.shapes.split(","):
            for db in dbs:
                one = [sys.executable, __file__, "--one", f"{size},{shape},{db}"]
                one += ["--repeat", str(args.repeat), "--profile", args.profile]
                one += ["--slice", str(args.slice)]
                out = subprocess.run(one, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(out.splitlines()[-1]))
                print(f"# {results[-1]}", file=sys.stderr, flush=True)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{NODES} nodes, {INPUTS} stage-ins a job, 1/6 of the jobs running\n")
    print(table(results))


if __name__ == "__main__":
    main()
