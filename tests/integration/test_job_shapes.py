"""Job shapes beyond one single-node batch job, on the real dev cluster: a job array whose
tasks share a dataset, a three-node job whose every node reads its inputs and writes
outputs back, a heterogeneous job whose components each read their inputs on their own
nodes, and a job Slurm runs again after it ended or while it ran (issue: real clusters, job
shapes)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files, wait_until

pytestmark = pytest.mark.integration

TASKS = 100

ARRAY_JOB = """#!/bin/bash
#SBATCH --array=0-{last}%5
#SBATCH --job-name=arr
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-out=out:s3://results/{run}/%A_%a/
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/out"
echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $(find -L "$HPCSTAGE_DIR/data" -type f | wc -l)" \\
    > "$HPCSTAGE_DIR/out/task"
"""


MULTI_NODE_JOB = """#!/bin/bash
#SBATCH --nodes=3
#SBATCH --job-name=multi
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-out=out:s3://results/{run}/%j/%N/
#HPCSTAGE --stage-out=summary.txt:s3://results/{run}/%j/summary.txt
eval "$(hpcstage env)"
echo "batch on $SLURMD_NODENAME" > "$HPCSTAGE_DIR/summary.txt"
srun --nodes=3 --ntasks=3 bash -c '
    eval "$(hpcstage env)" || exit 1
    mkdir -p "$HPCSTAGE_DIR/out"
    n=$(find -L "$HPCSTAGE_DIR/data" -type f | wc -l)
    echo "$SLURMD_NODENAME $n" > "$HPCSTAGE_DIR/out/result"
'
"""


# Two components: one node, then two. The directives are the whole job's, also those after
# `#SBATCH hetjob`; steps of every component (`srun --het-group=0,1`) read the inputs.
HET_JOB = """#!/bin/bash
#SBATCH --job-name=het
#SBATCH --nodes=1
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-out=out:s3://results/{run}/%j/%N/
#SBATCH hetjob
#SBATCH --nodes=2
#HPCSTAGE --stage-out=summary.txt:s3://results/{run}/%j/summary.txt
eval "$(hpcstage env)"
echo "leader on $SLURMD_NODENAME" > "$HPCSTAGE_DIR/summary.txt"
srun --het-group=0,1 bash -c '
    eval "$(hpcstage env)" || exit 1
    mkdir -p "$HPCSTAGE_DIR/out"
    n=$(find -L "$HPCSTAGE_DIR/data" -type f | wc -l)
    echo "$SLURMD_NODENAME $SLURM_JOB_ID $n" > "$HPCSTAGE_DIR/out/result"
'
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "shapes")


def _keys(dev: DevCluster, prefix: str) -> dict[str, bytes]:
    async def listing() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        async with dev.s3_client() as s3:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket="results", Prefix=prefix)
            async for page in pages:
                for item in page.get("Contents", []):
                    answer = await s3.get_object(Bucket="results", Key=item["Key"])
                    async with answer["Body"] as body:
                        found[item["Key"][len(prefix) :]] = await body.read()
        return found

    return asyncio.run(listing())


def test_an_array_writes_each_task_under_its_own_id_and_brings_each_object_once_per_node(
    stager: Stager,
) -> None:
    files = small_files(30, prefix="lig/")
    src, _ = make_dataset(stager.dev, files)
    run = f"arr-{uuid.uuid4().hex[:6]}"
    array = stager.submit("alice", ARRAY_JOB.format(last=TASKS - 1, src=src, run=run))

    def every_task_written_back() -> bool:
        return len(_keys(stager.dev, f"{run}/")) >= TASKS

    wait_until(f"{TASKS} tasks' outputs in the store", every_task_written_back, 600, stager.log)
    outputs = _keys(stager.dev, f"{run}/")
    # %A_%a right in every task's key: the array's id and the task's own number, never
    # sbatch's 4294967294 (the task that keeps the array's record learns its number late).
    assert sorted(outputs) == sorted(f"{array}_{a}/task" for a in range(TASKS))
    for a in range(TASKS):
        assert outputs[f"{array}_{a}/task"].decode().split() == [str(array), str(a), "30"]
    docs = [doc for doc in _array_docs(stager, array)]
    assert len(docs) == TASKS
    # One GET per object per node, however many of the tasks ran there.
    nodes = {n for doc in docs for n in doc["nodes"]}
    full = [stager.doc(d["job_id"]) for d in docs]
    for node in nodes:
        # Each object reached the node once: from the store, or copied from another node's
        # cache (peer copy, when a first task there started after another node had it).
        came = [
            (doc["job_id"], st["fetched_files"], st["peer_files"])
            for doc in full
            for r in doc["requests"]
            if r["direction"] == "in" and (st := r["nodes"].get(node))
        ]
        assert sum(f + p for _, f, p in came) == len(files), (node, [c for c in came if any(c[1:])])


def _array_docs(stager: Stager, array: int) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = stager.client.get("/api/v1/jobs?all=true")
    return [d for d in listing if d.get("array_job_id") == array]


def test_a_three_node_job_reads_its_inputs_on_every_node_and_writes_back_each_nodes_outputs(
    stager: Stager,
) -> None:
    files = small_files(12, prefix="lig/")
    src, _ = make_dataset(stager.dev, files)
    run = f"multi-{uuid.uuid4().hex[:6]}"
    job = stager.submit("alice", MULTI_NODE_JOB.format(src=src, run=run))
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    doc = stager.wait_doc(job, "its outputs written back", lambda d: d["stage_out"] == "done")
    outputs = _keys(stager.dev, f"{run}/{job}/")
    # Every node's own outputs under its name (%N), the batch host's file once (no %N).
    assert sorted(outputs) == ["n1/result", "n2/result", "n3/result", "summary.txt"], doc
    for node in ("n1", "n2", "n3"):
        assert outputs[f"{node}/result"].decode().split() == [node, "12"]
    assert outputs["summary.txt"].decode().startswith("batch on n")


def test_a_het_job_is_staged_on_each_components_nodes_and_written_back_once(
    stager: Stager,
) -> None:
    files = small_files(12, prefix="lig/")
    src, _ = make_dataset(stager.dev, files)
    run = f"het-{uuid.uuid4().hex[:6]}"
    job = stager.submit("alice", HET_JOB.format(src=src, run=run))  # the leader's id
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    doc = stager.wait_doc(job, "its outputs written back", lambda d: d["stage_out"] == "done")
    # One job to hpcstage, on the nodes of both components; the second component (the next
    # id) is no job of its own.
    assert sorted(doc["nodes"]) == ["n1", "n2", "n3"], doc
    listing: list[dict[str, Any]] = stager.client.get("/api/v1/jobs?all=true")
    assert [d["job_id"] for d in listing if d["job_id"] in (job, job + 1)] == [job]
    stage_in = [r for r in doc["requests"] if r["direction"] == "in"]
    assert [sorted(r["nodes"]) for r in stage_in] == [["n1", "n2", "n3"]]
    outputs = _keys(stager.dev, f"{run}/{job}/")
    # Every node's own outputs under its name, whichever component it was in; the leader's
    # summary once (not once per component).
    assert sorted(outputs) == ["n1/result", "n2/result", "n3/result", "summary.txt"], doc
    for node in ("n1", "n2", "n3"):
        assert outputs[f"{node}/result"].decode().split() == [node, str(job), "12"]
    assert outputs["summary.txt"].decode().startswith("leader on n")
    (summary,) = [r for r in doc["requests"] if r["direction"] == "out" and "summary" in r["dest"]]
    assert len(summary["nodes"]) == 1, summary


RERUN_JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-out=out:s3://results/{run}/%j/
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/out"
n=$(find -L "$HPCSTAGE_DIR/data" -type f | wc -l)
echo "run ${{SLURM_RESTART_COUNT:-0}} $n" > "$HPCSTAGE_DIR/out/result"
"""


def test_a_job_requeued_after_it_ended_is_staged_again_and_its_rerun_written_back(
    stager: Stager,
) -> None:
    src, _ = make_dataset(stager.dev, small_files(5, prefix="lig/"))
    run = f"rerun-{uuid.uuid4().hex[:6]}"
    job = stager.submit("alice", RERUN_JOB.format(src=src, run=run))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    stager.wait_doc(job, "the first run written back", lambda d: d["stage_out"] == "done")
    key = f"{job}/result"
    assert _keys(stager.dev, f"{run}/")[key].decode().split() == ["run", "0", "5"]
    proc.run(["scontrol", "requeue", str(job)], env=stager.dev.client_env())
    # Slurm holds a requeued job back for a while (its begin time); not a thing to wait for.
    update = ["scontrol", "update", f"JobId={job}", "StartTime=now"]
    proc.run(update, env=stager.dev.client_env(), check=False)

    def rerun_written() -> bool:
        return _keys(stager.dev, f"{run}/").get(key, b"").decode().split() == ["run", "1", "5"]

    wait_until("the re-run's output in the store", rerun_written, 180, stager.log)
    assert "cannot start" not in stager.output("alice", job)
    # The first run's object was replaced, not lost: it is in the recycle bin.
    trash = stager.cli("alice", "trash", "ls", f"s3://results/{run}/", "--json").stdout
    assert [e["key"] for e in json.loads(trash)] == [f"{run}/{key}"], trash


REQUEUED_WHILE_RUNNING_JOB = """#!/bin/bash
#SBATCH --requeue
#SBATCH --nodelist={node}
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-out=out:s3://results/{run}/%j/
eval "$(hpcstage env)"
mkdir -p "$HPCSTAGE_DIR/out"
run=${{SLURM_RESTART_COUNT:-0}}
left=$(ls -A "$HPCSTAGE_DIR/out")
if [ "$run" = 0 ]; then
    echo partial > "$HPCSTAGE_DIR/out/partial"
    echo "first run wrote its file"
    sleep 600
fi
n=$(find -L "$HPCSTAGE_DIR/data" -type f | wc -l)
echo "run $run $n ${{left:-nothing-left}}" > "$HPCSTAGE_DIR/out/result"
"""


def _requeue(stager: Stager, job: int, how: str) -> None:
    """Make Slurm requeue the running ``job``: by command, or by its node failing (set DOWN:
    Slurm requeues the job at once, and the node, whose slurmd still answers, comes back by
    ReturnToService=2)."""
    env = stager.dev.client_env()
    if how == "scontrol requeue":
        proc.run(["scontrol", "requeue", str(job)], env=env)
        return
    down = ["scontrol", "update", "NodeName=n2", "State=DOWN", "Reason=test_job_shapes"]
    proc.run(down, env=env)

    def requeued() -> bool:
        return stager.dev.job_state(job).get("Restarts") == "1"

    wait_until(f"job {job} requeued after its node failed", requeued, 120, stager.log)
    proc.run(["scontrol", "update", "NodeName=n2", "State=RESUME"], env=env, check=False)


@pytest.mark.parametrize("how", ["scontrol requeue", "node failure"])
def test_a_job_requeued_while_it_ran_reruns_in_a_fresh_directory_and_only_the_rerun_is_written(
    stager: Stager, how: str
) -> None:
    src, _ = make_dataset(stager.dev, small_files(5, prefix="lig/"))
    run = f"requeue-{uuid.uuid4().hex[:6]}"
    # The same node again: there the first run's directory would still be found.
    job = stager.submit("alice", REQUEUED_WHILE_RUNNING_JOB.format(node="n2", src=src, run=run))

    def first_run_wrote() -> bool:
        path = stager.dev.workdir("alice") / f"{job}.out"
        return path.exists() and "first run wrote its file" in path.read_text(errors="replace")

    wait_until("the first run's partial output", first_run_wrote, 180, stager.log)
    _requeue(stager, job, how)
    update = ["scontrol", "update", f"JobId={job}", "StartTime=now"]
    proc.run(update, env=stager.dev.client_env(), check=False)

    def rerun_written() -> bool:
        return f"{job}/result" in _keys(stager.dev, f"{run}/")

    wait_until("the re-run's output in the store", rerun_written, 240, stager.log)
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    doc = stager.wait_doc(job, "its outputs written back", lambda d: d["stage_out"] == "done")
    outputs = _keys(stager.dev, f"{run}/")
    # The re-run saw its inputs and none of the first run's files; the first run's partial
    # output was not written back (it never ended: its re-run writes the job's outputs).
    assert outputs == {f"{job}/result": b"run 1 5 nothing-left\n"}, (outputs, doc)
    trash = stager.cli("alice", "trash", "ls", f"s3://results/{run}/", "--json").stdout
    assert json.loads(trash) == [], trash
