"""`hpcstage status` in squeue's idiom on the real dev cluster (issue 19 item 3): a 3-node job
and a 20-task array as users see them, and each filter answered by the daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin
from hpcstage.watch.slurm.hostlist import compress_hostlist

from .staging import Stager, make_dataset, running_stager, small_files, wait_until

pytestmark = pytest.mark.integration

WIDTH = 100
JOB = '#!/bin/bash\n#HPCSTAGE --stage-in={src}\neval "$(hpcstage env)"\n{then}\n'


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "status")


def _status(stager: Stager, user: str, *args: str) -> list[str]:
    """The lines of `hpcstage status ARGS` as ``user`` (root: an admin of the API)."""
    cwd = Path("/") if user == "root" else None
    argv = [hpcstage_bin(), "status", *args]
    out = stager.dev.run_as(user, argv, env=stager.env(), cwd=cwd).stdout
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), out
    return lines


def _jobs(stager: Stager, user: str, *args: str) -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(stager.cli(user, "status", "--json", *args).stdout)
    return found


def test_a_three_node_job_and_a_20_task_array_in_squeues_idiom(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(4))
    nodes = compress_hostlist(stager.dev.info.nodes)
    wide = stager.submit(
        "alice",
        JOB.format(src=src, then="sleep 300"),
        f"--nodes={len(stager.dev.info.nodes)}",
        "--account=chem",
    )
    stager.wait_doc(
        wide,
        "running with its inputs on every node",
        lambda d: d["state"] == "RUNNING" and set(d["staging"].values()) == {"ready"},
    )
    # Every CPU is the 3-node job's: the array waits as one record of 20 tasks.
    array = stager.submit("bob", JOB.format(src=src, then="true"), "--array=0-19", "--account=bio")
    stager.wait_doc(array, "the pending array recorded", lambda d: d["state"] == "PENDING")

    mine = _status(stager, "alice")
    assert mine[0].split() == [
        "JOBID", "NAME", "USER", "ACCOUNT", "STATE", "STAGING", "STAGE-OUT", "NODELIST(REASON)"
    ]  # fmt: skip
    assert len(mine) == 2 and mine[1].split()[0] == str(wide), mine
    assert mine[1].split()[2:] == ["alice", "chem", "RUNNING", "READY", "3/3", "-", nodes], mine
    assert _status(stager, "bob", "-h", "-o", "%i %u %a %T") == [f"{array}_[0-19] bob bio PENDING"]
    # Filters, answered by the daemon: an admin sees everyone unless told whose or which.
    both = _status(stager, "root", "-h", "-o", "%A", "-u", "alice,bob")
    assert both == [str(wide), str(array)]
    assert _status(stager, "root", "-h", "-o", "%A", "-u", "bob") == [str(array)]
    assert _status(stager, "root", "-h", "-o", "%A", "-t", "PD") == [str(array)]
    assert _status(stager, "root", "-h", "-o", "%A", "-t", "running,CG") == [str(wide)]
    assert _status(stager, "alice", "-h", "-o", "%A", "-u", "bob") == []  # not hers to see
    assert _status(stager, "alice", "-h", "-o", "%A", "--me") == [str(wide)]
    assert _status(stager, "root", "--me", "--all") == ["no jobs with staging directives"]
    name = _jobs(stager, "alice")[0]["name"]  # whole: --parsable cuts nothing
    assert _status(stager, "alice", "--parsable", "-o", "%i %j %D %N") == [
        "JOBID|NAME|NODES|NODELIST",
        f"{wide}|{name}|3|{nodes}",
    ]
    verbose = _status(stager, "alice", "-v", "-h")
    assert [line.split()[:3] for line in verbose[1:]] == [
        ["node", n, "ready"] for n in stager.dev.info.nodes
    ]

    # The job ends; the array's tasks run, each its own job: A_0 ... A_19.
    stager.dev.run_as("alice", ["scancel", str(wide)])
    stager.wait_doc(array, "the array's last task ended", lambda d: d["ended_at"] is not None)

    def tasks_ended() -> bool:
        tasks = _jobs(stager, "bob", "--all")
        return len(tasks) == 20 and all(t["ended_at"] for t in tasks)

    wait_until("20 tasks recorded and ended", tasks_ended, 240, stager.log)
    listing = _status(stager, "bob", "--all", "-t", "CD")
    assert sorted(line.split()[0] for line in listing[1:]) == sorted(
        f"{array}_{task}" for task in range(20)
    ), listing
    assert all(line.split()[2:5] == ["bob", "bio", "COMPLETED"] for line in listing[1:]), listing
    # One task whole, named as squeue names it (its lines hold paths: no width to keep).
    task = stager.cli("bob", "status", f"{array}_3").stdout.splitlines()
    assert task[0].startswith(f"job {array}_3 (") and "user bob account bio: COMPLETED" in task[0]
    doc = json.loads(stager.cli("bob", "status", f"{array}_3", "--json").stdout)
    assert (doc["array_job_id"], doc["array_task_id"]) == (array, 3), doc
