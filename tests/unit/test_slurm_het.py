"""Heterogeneous jobs in Slurm's output (22.05 recorded, 24.11 written from its schema): one
record per component, folded into one job under the leader's id (watch/slurm/het.py)."""

from __future__ import annotations

import dataclasses
from datetime import UTC
from pathlib import Path

from hpcstage.watch.slurm.het import het_job, merge_het_jobs
from hpcstage.watch.slurm.model import JobInfo, QueueSnapshot
from hpcstage.watch.slurm.parse import (
    SqueueMemo,
    merge_planned,
    parse_scontrol_show_job,
    parse_squeue_json,
    parse_squeue_start,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
V2205 = GOLDEN / "slurm-22.05"
V2411 = GOLDEN / "slurm-24.11"
ADMIN = "hpcstage:v1:in=s3://x/y:data;end"


def golden(path: Path) -> str:
    return path.read_text()


def het_fields(job: JobInfo) -> tuple[object, ...]:
    return (job.job_id, job.het_job_id, job.het_job_offset, job.state, job.nodes, job.batch_host)


def test_2205_lists_each_component_of_a_running_het_job() -> None:
    snapshot = parse_squeue_json(golden(V2205 / "squeue-het-running.json"))
    assert [het_fields(job) for job in snapshot.jobs] == [
        (1, 1, 0, "RUNNING", ("n1",), "n1"),
        (2, 1, 1, "RUNNING", ("n2", "n3"), "n2"),
    ]
    # job_submit.lua saw the script of the leader only.
    assert [job.admin_comment for job in snapshot.jobs] == [ADMIN, ""]


def test_2205_running_het_job_is_one_job_on_every_components_nodes() -> None:
    snapshot = merge_het_jobs(parse_squeue_json(golden(V2205 / "squeue-het-running.json")))
    (job,) = snapshot.jobs
    assert het_fields(job) == (1, 1, 0, "RUNNING", ("n1", "n2", "n3"), "n1")
    assert job.admin_comment == ADMIN


def test_2205_pending_het_job_is_planned_on_every_components_nodes() -> None:
    snapshot = parse_squeue_json(golden(V2205 / "squeue-het-pending.json"))
    starts = parse_squeue_start(golden(V2205 / "squeue-start-het.txt"), tz=UTC)
    merged = merge_het_jobs(merge_planned(snapshot, starts))
    by_id = {job.job_id: job for job in merged.jobs}
    # 1-2: the het job that ended; 3: an ordinary job (no het fields); 4-5: a pending het job.
    assert sorted(by_id) == [1, 3, 4]
    assert (by_id[1].state, by_id[1].nodes, by_id[1].exit_code) == (
        "COMPLETED",
        ("n1", "n2", "n3"),
        0,
    )
    assert (by_id[3].het_job_id, by_id[3].het_job_offset, by_id[3].nodes) == (
        None,
        None,
        ("n1", "n2", "n3"),
    )
    pending = by_id[4]
    assert (pending.state, pending.state_reason) == ("PENDING", "Resources")
    assert (pending.nodes, pending.planned_nodes) == ((), ("n1", "n2", "n3"))


def test_2411_het_job_gives_the_same_records() -> None:
    snapshot = parse_squeue_json(golden(V2411 / "squeue-het.json"))
    assert [(job.job_id, job.het_job_id, job.het_job_offset) for job in snapshot.jobs] == [
        (21, 21, 0),
        (22, 21, 1),
        (24, 24, 0),
        (25, 24, 1),
    ]
    running, pending = merge_het_jobs(snapshot).jobs
    assert het_fields(running) == (21, 21, 0, "RUNNING", ("n1", "n2", "n3"), "n1")
    assert running.admin_comment == ADMIN
    # 24.11's JSON carries each component's planned nodes itself.
    assert (pending.job_id, pending.state, pending.planned_nodes) == (
        24,
        "PENDING",
        ("n1", "n2", "n3"),
    )


def test_2411_ordinary_jobs_have_no_het_fields() -> None:
    snapshot = parse_squeue_json(golden(V2411 / "squeue.json"))
    assert {(job.het_job_id, job.het_job_offset) for job in snapshot.jobs} == {(None, None)}
    assert merge_het_jobs(snapshot) == snapshot


def test_2205_scontrol_show_job_names_the_components() -> None:
    jobs = parse_scontrol_show_job(golden(V2205 / "scontrol-show-job-het.txt"), tz=UTC)
    assert [(job.job_id, job.het_job_id, job.het_job_offset, job.nodes) for job in jobs] == [
        (4, 4, 0, ("n1",)),
        (5, 4, 1, ("n2", "n3")),
    ]


def test_a_changed_het_field_is_read_again_through_the_memo() -> None:
    text = golden(V2205 / "squeue-het-running.json")
    memo = SqueueMemo()
    parse_squeue_json(text, memo=memo)
    again = parse_squeue_json(text.replace('"het_job_offset": 1', '"het_job_offset": 2'), memo=memo)
    assert [job.het_job_offset for job in again.jobs] == [0, 2]


def component(job_id: int, offset: int, state: str, nodes: tuple[str, ...]) -> JobInfo:
    return JobInfo(
        job_id=job_id,
        array_job_id=None,
        array_task_id=None,
        name="het",
        user="alice",
        uid=1001,
        account="",
        partition="debug",
        state=state,
        state_reason="",
        priority=1,
        submit_time=1.0,
        start_time=2.0,
        end_time=None,
        nodes=nodes,
        planned_nodes=(),
        batch_host=nodes[0],
        admin_comment=ADMIN if offset == 0 else "",
        comment="",
        work_dir="/w",
        exit_code=0 if state == "COMPLETED" else None,
        het_job_id=10,
        het_job_offset=offset,
    )


def test_a_het_job_is_over_only_when_every_component_is() -> None:
    leader = component(10, 0, "COMPLETED", ("n1",))
    other = component(11, 1, "COMPLETING", ("n2",))
    job = het_job([other, leader])  # in any order
    assert (job.job_id, job.state, job.exit_code, job.batch_host) == (10, "COMPLETING", None, "n1")
    done = het_job([leader, dataclasses.replace(other, state="COMPLETED", exit_code=0)])
    assert (done.state, done.exit_code) == ("COMPLETED", 0)


def test_a_node_two_components_share_is_listed_once() -> None:
    job = het_job(
        [component(10, 0, "RUNNING", ("n1", "n2")), component(11, 1, "RUNNING", ("n2", "n3"))]
    )
    assert job.nodes == ("n1", "n2", "n3")


def test_a_component_without_its_leader_in_the_snapshot_is_left_out() -> None:
    # Never seen from slurmctld, which lists and purges a het job's records together.
    lone = component(11, 1, "RUNNING", ("n2",))
    snapshot = QueueSnapshot(0.0, "22.05.8", (lone,))
    assert merge_het_jobs(snapshot).jobs == ()
