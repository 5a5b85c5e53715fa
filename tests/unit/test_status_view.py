"""`hpcstage status` in squeue's idiom: the pure formatter over the API's job summaries."""

from __future__ import annotations

import time
from typing import Any

import pytest
from click.testing import CliRunner

from hpcstage.cli.status_view import (
    DEFAULT_FORMAT,
    array_task,
    job_text,
    jobs_query,
    jobs_table,
    kept,
    parse_format,
    parse_job_id,
    parse_states,
    parse_users,
    staging_summary,
)
from hpcstage.cli.user_cmds import status

WIDTH = 100  # what a listing must fit in, whatever the job's shape


def summary(**fields: Any) -> dict[str, Any]:
    """A job summary as hpcstage.api.status.job_summary writes it (a running 1-node job)."""
    doc: dict[str, Any] = {
        "id": 1, "kind": "job", "job_id": 4242, "array_job_id": None, "array_task_id": None,
        "array_tasks": "", "name": "docking", "user": "alice", "account": "chem",
        "partition": "debug", "state": "RUNNING", "reason": "None", "planned_nodes": [],
        "nodes": ["n1"], "expected_start": None, "started_at": 10.0, "ended_at": None,
        "error": "", "directive_source": "admin_comment", "staging": {"n1": "ready"},
        "failure": "", "stage_out": "pending", "ready_at": {"n1": 5.0},
    }  # fmt: skip
    doc.update(fields)
    return doc


def three_node_job() -> dict[str, Any]:
    """Staging ahead of a pending 3-node job: two nodes hold every input, one still fetches."""
    return summary(
        job_id=4243,
        name="md-equilibration",
        user="alexandra",
        account="chemistry-lab",
        state="PENDING",
        reason="Resources",
        nodes=[],
        planned_nodes=["node001", "node002", "node003"],
        staging={"node001": "ready", "node002": "ready", "node003": "staging"},
        stage_out="none",
        ready_at={"node001": 5.0},
    )


def array_tasks(count: int = 20) -> list[dict[str, Any]]:
    """A 20-task array as the daemon records it: each task its own job on one node."""
    return [
        summary(
            id=10 + task,
            job_id=5000 + task,
            array_job_id=5000,
            array_task_id=task,
            name="screen-ligands",
            nodes=[f"n{task % 3 + 1}"],
            staging={f"n{task % 3 + 1}": "ready"},
        )
        for task in range(count)
    ]


def test_a_three_node_job_and_a_20_task_array_fit_in_100_columns() -> None:
    table = jobs_table([three_node_job(), *array_tasks()], verbose=True)
    lines = table.splitlines()
    assert len(lines) == 1 + 1 + 3 + 20 + 20, table  # header, the job, its nodes, the tasks
    assert max(len(line) for line in lines) <= WIDTH, table
    assert lines[0].split() == [
        "JOBID", "NAME", "USER", "ACCOUNT", "STATE", "STAGING", "STAGE-OUT", "NODELIST(REASON)"
    ]  # fmt: skip
    # squeue's cuts (a name to its column), a hostlist, and how many nodes are ready.
    assert lines[1].split() == [
        "4243", "md-equilib", "alexandr", "chemistr", "PENDING", "READY", "2/3", "-",
        "node[001-003]",
    ]  # fmt: skip
    assert [line.split() for line in lines[2:5]] == [
        ["node", "node001", "ready", "since", _clock(5.0)],
        ["node", "node002", "ready"],
        ["node", "node003", "staging"],
    ]
    tasks = [line.split()[0] for line in lines[5:] if line.split()[0] != "node"]
    assert tasks == [f"5000_{task}" for task in range(20)]


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def test_the_old_table_named_every_node_and_broke_at_three() -> None:
    """Issue 19 item 3: no column may grow with the job's node count but the last."""
    wide = three_node_job() | {"planned_nodes": [f"gpu{n:03d}" for n in range(1, 65)]}
    wide["staging"] = dict.fromkeys(wide["planned_nodes"], "ready")
    line = jobs_table([wide], header=False)
    assert line.endswith(" gpu[001-064]") and len(line) <= WIDTH, line
    assert "READY 64/64" in line


def test_a_pending_arrays_record_shows_its_remaining_tasks_as_squeue_does() -> None:
    pending = summary(array_job_id=5000, job_id=5000, array_tasks="4-19%2", nodes=[])
    assert jobs_table([pending], "%i|%F|%K", header=False) == "5000_[4-19%2]|5000|4-19%2"
    plain = jobs_table([summary()], "%i %F %K %A", header=False)
    assert plain == "4242 4242 N/A 4242"
    warmup = summary(kind="warmup", id=7, job_id=None, state="WARMUP")
    assert jobs_table([warmup], "%i %A %F %K %t", header=False) == (
        "warmup-7 warmup-7 warmup-7 N/A WARMUP"
    )
    kept = summary(kind="pin", id=9, job_id=None, state="PINNED")  # hpcstage pin
    assert jobs_table([kept], "%i %A %F %K %t", header=False) == "pin-9 pin-9 pin-9 N/A PINNED"


@pytest.mark.parametrize(
    ("staging", "nodes", "shown"),
    [
        ({}, ["n1"], "-"),
        ({"n1": "ready", "n2": "failed"}, ["n1", "n2"], "FAILED 1/2"),
        ({"n1": "released", "n2": "released"}, ["n1", "n2"], "RELEASED"),
        ({"n1": "ready"}, ["n1", "n2"], "READY 1/2"),  # n2 not yet begun
        ({"n9": "ready", "n1": "staging"}, ["n1"], "READY 0/1"),  # n9 was the old plan
    ],
)
def test_staging_counts_the_nodes_the_job_aims_at(
    staging: dict[str, str], nodes: list[str], shown: str
) -> None:
    assert staging_summary(summary(staging=staging, nodes=nodes)) == shown


def test_a_format_chooses_columns_widths_and_justification_as_squeue_o() -> None:
    job = summary()
    assert jobs_table([job], "%i %j %u %a %T %N", header=False) == (
        "4242 docking alice chem RUNNING n1"
    )
    assert jobs_table([job], "%.6i|%3j|%4u|%%", header=False) == "  4242|doc|alic|%"
    assert jobs_table([job], "id=%i %t %D", header=True).splitlines() == [
        "id=JOBID ST NODES",
        "id=4242 R 1",
    ]
    failed = summary(failure="s3://b/x: no such object", staging={"n1": "failed"})
    assert jobs_table([failed], "%{staging} %R", header=False) == (
        "FAILED 1/1 n1 (FAILED: s3://b/x: no such object)"
    )


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("%i %x", "unknown field '%x'"),
        ("%{bogus}", "unknown field '%{bogus}'"),
        ("%i %", "a lone % at the end"),
        ("%.i", "'%.' needs a size"),
        ("just text", "names no field"),
        ("%%", "names no field"),
    ],
)
def test_a_bad_format_is_refused_with_the_fault_named(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("(", r"\(").replace(".", r"\.")):
        parse_format(spec)


def test_noheader_drops_only_the_header() -> None:
    with_header = jobs_table([summary(), summary(job_id=4)]).splitlines()
    assert jobs_table([summary(), summary(job_id=4)], header=False).splitlines() == with_header[1:]
    assert jobs_table([]) == "no jobs with staging directives"  # a person is told
    assert jobs_table([], header=False) == ""  # a script reads no line, as from squeue -h


def test_parsable_joins_values_with_bars_and_escapes_a_bar_in_one() -> None:
    job = summary(name="a|b", nodes=["n1", "n2", "n3"], staging={})
    table = jobs_table([job], "%i %j %u %N", parsable=True)
    assert table.splitlines() == ["JOBID|NAME|USER|NODELIST", "4242|a\\x7cb|alice|n[1-3]"]
    assert jobs_table([job], parsable=True, header=False).split("|") == [
        "4242", "a\\x7cb", "alice", "chem", "RUNNING", "-", "pending", "n[1-3]"
    ]  # fmt: skip
    assert jobs_table([], parsable=True, header=False) == ""  # nothing for a script to misread


def test_verbose_shows_each_node_also_one_no_longer_aimed_at() -> None:
    job = summary(nodes=["n2"], staging={"n1": "released", "n2": "staging"}, ready_at={})
    lines = jobs_table([job], "%i", header=False, verbose=True).splitlines()
    assert [line.split() for line in lines] == [
        ["4242"],
        ["node", "n2", "staging"],
        ["node", "n1", "released", "(no", "longer", "a", "target)"],
    ]


def test_one_job_names_its_array_task_and_compresses_its_nodes() -> None:
    doc = summary(array_job_id=5000, array_task_id=3, planned_nodes=["n1", "n2", "n3"])
    doc |= {"nodes": ["n1", "n2", "n3"], "staging": {"n1": "ready", "n2": "ready"}}
    doc |= {"requests": [], "events": []}
    lines = job_text(doc).splitlines()
    assert lines[0] == "job 5000_3 (docking) user alice account chem: RUNNING None"
    assert lines[1].startswith("  planned nodes: n[1-3]   nodes: n[1-3]")
    assert lines[2] == "  staging: READY 2/3 (n1 ready, n2 ready)"


def test_states_are_read_as_squeue_t_reads_them() -> None:
    assert parse_states("pd,R,completing") == ["PENDING", "RUNNING", "COMPLETING"]
    assert parse_states("R,all") == []
    assert parse_states("OOM, warmup") == ["OUT_OF_MEMORY", "WARMUP"]
    with pytest.raises(ValueError, match="unknown job state 'RUNING'"):
        parse_states("RUNING")


def test_users_are_a_comma_list() -> None:
    assert parse_users("alice, bob,") == ["alice", "bob"]
    for bad in (",", "", "a\x1b[2J", "x" * 65):
        with pytest.raises(ValueError, match="expected USER"):
            parse_users(bad)


def test_the_daemon_is_asked_for_the_filtered_jobs_only() -> None:
    assert jobs_query(False, [], []) == "/api/v1/jobs?all=false"
    assert jobs_query(True, ["alice", "b&b"], ["RUNNING", "PENDING"]) == (
        "/api/v1/jobs?all=true&user=alice&user=b%26b&state=RUNNING&state=PENDING"
    )


def test_jobid_is_a_job_or_an_array_task_as_squeue_names_them() -> None:
    assert parse_job_id("4242") == [4242]
    assert parse_job_id("5000_3") == [5000, 3]
    for bad in ("5000_[1-3]", "-1", "x", "5000_", "1" * 19):
        with pytest.raises(ValueError, match="expected a job id"):
            parse_job_id(bad)
    tasks = array_tasks(5)
    assert array_task(tasks, 5000, 3) == 5003
    assert array_task(tasks, 5000, 7) is None
    assert array_task(tasks, 4999, 3) is None


def test_a_daemon_that_ignores_the_filters_is_filtered_after_it() -> None:
    jobs = [summary(job_id=1), summary(job_id=2, user="bob", state="PENDING")]
    assert [j["job_id"] for j in kept(jobs, ["bob"], [])] == [2]
    assert [j["job_id"] for j in kept(jobs, [], ["RUNNING"])] == [1]
    assert [j["job_id"] for j in kept(jobs, ["alice"], ["PENDING"])] == []
    assert kept(jobs, [], []) == jobs


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["-u", "alice", "--me"], "--me and -u: give one of them"),
        (["-t", "RUNING"], "unknown job state 'RUNING'"),
        (["-o", "%i %x"], "unknown field '%x'"),
        (["7", "-o", "%i"], "-o: for listings; JOBID shows one job whole"),
        (["7", "--parsable"], "--parsable: for listings"),
        (["--json", "-h"], "-h: not with --json"),
        (["-u", ","], "expected USER"),
    ],
)
def test_options_that_cannot_work_are_usage_errors_before_the_daemon_is_asked(
    args: list[str], complaint: str
) -> None:
    result = CliRunner().invoke(status, ["--config", "/nonexistent.toml", *args])
    assert result.exit_code == 2, result.output
    assert complaint in result.output, result.output


def test_help_keeps_minus_h_for_noheader_and_documents_the_format() -> None:
    result = CliRunner().invoke(status, ["--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "-h, --noheader" in result.output
    assert f'default: -o "{DEFAULT_FORMAT}"' in result.output
    for field in ("%i", "%j", "%u", "%a", "%T", "%N", "%{staging}"):
        assert field in result.output
