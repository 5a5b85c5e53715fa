"""The dashboard's document (hpcstage.api.overview): progress per node and waits at start,
from rows built in memory."""

from __future__ import annotations

from hpcstage.api.overview import progress, wait_rows
from hpcstage.db import Job, Request, Staging


def job_with(*stagings: Staging, **fields: object) -> Job:
    job = Job(id=7, kind="job", slurm_job_id=70, user="alice", **fields)
    job.requests = [Request(src="s3://d/x/", dest="x", direction="in", stagings=list(stagings))]
    return job


def test_progress_adds_one_nodes_inputs_and_prefers_live_counters_of_running_ones() -> None:
    done = Staging(
        id=1, node="n1", state="ready", files_done=4, files_total=4, bytes_done=40, bytes_total=40
    )
    running = Staging(
        id=2,
        node="n1",
        state="running",
        files_done=1,
        files_total=10,
        bytes_done=10,
        bytes_total=100,
    )
    live = {2: {"files_done": 6, "bytes_done": 60}, 1: {"files_done": 99}}
    assert progress([done, running], live) == {
        "files_done": 10,
        "bytes_done": 100,
        "files_total": 14,
        "bytes_total": 140,
    }
    unlisted = Staging(
        id=3,
        node="n1",
        state="queued",
        files_done=0,
        files_total=None,
        bytes_done=0,
        bytes_total=None,
    )
    assert progress([done, unlisted], {})["files_total"] is None


def test_a_wait_is_from_the_start_until_the_last_input_on_the_node_was_ready() -> None:
    def ready(node: str, at: float) -> Staging:
        return Staging(node=node, state="ready", finished_at=at)

    job = job_with(
        ready("n1", 95.0),
        ready("n1", 103.0),
        ready("n2", 90.0),
        Staging(node="n3", state="failed"),
        Staging(node="n4", state="running"),
        started_at=100.0,
        nodes="n1,n2,n3,n4",
    )
    rows = {r["node"]: r for r in wait_rows(job, now=130.0)}
    assert (rows["n1"]["waited"], rows["n1"]["inputs"]) == (3.0, "ready")
    assert rows["n2"]["waited"] == -10.0  # ready ten seconds before the start
    assert (rows["n3"]["waited"], rows["n3"]["inputs"]) == (None, "failed")
    assert (rows["n4"]["inputs"], rows["n4"]["so_far"]) == ("waiting", 30.0)
    job.ended_at = 120.0
    assert wait_rows(job, now=130.0)[3]["inputs"] == "ended"
    assert wait_rows(job_with(started_at=None, nodes="n1"), now=1.0) == []
