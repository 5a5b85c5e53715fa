"""Slurm output parsers against golden files (22.05 recorded; 24.11 recorded, and the 22.05
scenario written from 24.11's schema), and the thin CLI backend against fake Slurm commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcstage.errors import SlurmError
from hpcstage.watch.slurm.backend import CliBackend
from hpcstage.watch.slurm.model import JobInfo, NodeInfo, StartEstimate
from hpcstage.watch.slurm.parse import (
    detect_schema,
    merge_planned,
    normalize_job_state,
    parse_nodes_json,
    parse_scontrol_show_job,
    parse_scontrol_show_node,
    parse_squeue_json,
    parse_squeue_start,
    parse_version_output,
    release_tuple,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
V2205 = GOLDEN / "slurm-22.05"
V2411 = GOLDEN / "slurm-24.11"
V2411_RECORDED = GOLDEN / "slurm-24.11-recorded"


def golden(path: Path) -> str:
    return path.read_text()


def running(job_id: int, node: str, end: float, priority: int) -> JobInfo:
    return JobInfo(
        job_id=job_id,
        array_job_id=None,
        array_task_id=None,
        name="wrap",
        user="alice",
        uid=1001,
        account="",
        partition="debug",
        state="RUNNING",
        state_reason="None",
        priority=priority,
        submit_time=1795919905.0,
        start_time=1795919906.0,
        end_time=end,
        nodes=(node,),
        planned_nodes=(),
        batch_host=node,
        admin_comment="",
        comment="",
        work_dir="/tmp/sl/jobs",
        exit_code=None,
    )


# The scenario both golden sets record, as every source should report it.
EXPECTED_JOBS = (
    running(1, "n1", 1827455906.0, 4294901759),
    running(2, "n2", 1795920026.0, 4294901758),
    running(3, "n3", 1795920026.0, 4294901757),
    JobInfo(
        job_id=4,
        array_job_id=None,
        array_task_id=None,
        name="wrap",
        user="alice",
        uid=1001,
        account="",
        partition="debug",
        state="PENDING",
        state_reason="Resources",
        priority=4294901756,
        submit_time=1795919905.0,
        start_time=1795920026.0,
        end_time=1795920146.0,
        nodes=(),
        planned_nodes=("n2",),
        batch_host="",
        admin_comment="",
        comment="",
        work_dir="/tmp/sl/jobs",
        exit_code=None,
    ),
)
EXPECTED_NODES = tuple(
    NodeInfo(f"n{i}", "127.0.0.1", "localhost", "ALLOCATED", 1) for i in (1, 2, 3)
)


# --- squeue --json ------------------------------------------------------------------------


def test_2205_squeue_json_has_no_planned_nodes() -> None:
    snapshot = parse_squeue_json(golden(V2205 / "squeue.json"), taken_at=1795919910.0)
    assert snapshot.slurm_version == "22.05.8"
    assert snapshot.taken_at == 1795919910.0
    assert not snapshot.planned_nodes_known
    job4 = snapshot.job(4)
    assert job4 is not None
    assert job4.pending
    assert job4.planned_nodes == ()
    assert snapshot.jobs[:3] == EXPECTED_JOBS[:3]


def test_2205_squeue_start_gives_planned_node_and_expected_start() -> None:
    starts = parse_squeue_start(golden(V2205 / "squeue-start.txt"), tz=UTC)
    assert starts == (StartEstimate(4, 1795920026.0, ("n2",)),)


def test_2205_merged_snapshot_matches_the_scenario() -> None:
    snapshot = parse_squeue_json(golden(V2205 / "squeue.json"), taken_at=0.0)
    merged = merge_planned(snapshot, parse_squeue_start(golden(V2205 / "squeue-start.txt"), tz=UTC))
    assert merged.planned_nodes_known
    assert merged.jobs == EXPECTED_JOBS


def test_2411_squeue_json_carries_planned_nodes() -> None:
    snapshot = parse_squeue_json(golden(V2411 / "squeue.json"))
    assert snapshot.slurm_version == "24.11.7"
    assert snapshot.taken_at == 1795919909.0  # last_update, as no taken_at was given
    assert snapshot.planned_nodes_known
    assert snapshot.jobs == EXPECTED_JOBS


def test_2411_recorded_snapshot() -> None:
    """A real 24.11.5 controller's answer (see its README): every state, the plan, directives."""
    snapshot = parse_squeue_json(golden(V2411_RECORDED / "squeue.json"))
    assert (snapshot.slurm_version, snapshot.planned_nodes_known) == ("24.11.5", True)
    jobs = {job.job_id: job for job in snapshot.jobs}
    states = {job_id: job.state for job_id, job in jobs.items()}
    assert states == {
        **dict.fromkeys((1, 2, 3, 4, 5), "COMPLETED"),
        6: "FAILED",
        **dict.fromkeys((7, 8, 9, 10), "CANCELLED"),
        **dict.fromkeys((11, 12, 13), "RUNNING"),
        14: "PENDING",
    }
    assert [jobs[i].nodes for i in (11, 12, 13)] == [("n1",), ("n2",), ("n3",)]
    assert [jobs[i].batch_host for i in (11, 12, 13)] == ["n1", "n2", "n3"]
    waiting = jobs[14]
    assert (waiting.state_reason, waiting.nodes, waiting.planned_nodes) == (
        "Resources",
        (),
        ("n1",),
    )
    # The backfill plan: job 14 starts on n1 when job 11 (2 minutes) ends there.
    assert waiting.start_time == jobs[11].end_time > jobs[11].start_time
    assert (jobs[6].exit_code, jobs[6].state_reason) == (1, "NonZeroExitCode")
    assert jobs[4].admin_comment.startswith("hpcstage:v1:in=s3://datasets/docking/ligands/;")
    assert (jobs[4].user, jobs[1].user) == ("alice", "bob")
    nodes = parse_nodes_json(golden(V2411_RECORDED / "scontrol-show-nodes.json"))
    assert [(n.name, n.addr, n.state, n.cpus) for n in nodes] == [
        (f"n{i}", "127.0.0.1", "ALLOCATED", 1) for i in (1, 2, 3)
    ]
    assert parse_version_output(golden(V2411_RECORDED / "squeue-version.txt")) == "24.11.5"


def test_2205_scontrol_show_job_matches_the_scenario() -> None:
    jobs = parse_scontrol_show_job(golden(V2205 / "scontrol-show-job.txt"), tz=UTC)
    assert jobs == EXPECTED_JOBS


def test_schema_detection() -> None:
    old = detect_schema(json.loads(golden(V2205 / "squeue.json")))
    new = detect_schema(json.loads(golden(V2411 / "squeue.json")))
    assert (old.plugin, old.release, old.has_planned_nodes) == ("openapi/v0.0.38", "22.05.8", False)
    assert (new.plugin, new.release, new.has_planned_nodes) == (
        "data_parser/v0.0.42",
        "24.11.7",
        True,
    )


# --- nodes --------------------------------------------------------------------------------


def test_nodes_agree_across_sources() -> None:
    assert parse_nodes_json(golden(V2205 / "sinfo.json")) == EXPECTED_NODES
    assert parse_scontrol_show_node(golden(V2205 / "scontrol-show-node.txt")) == EXPECTED_NODES
    assert parse_nodes_json(golden(V2411 / "scontrol-show-nodes.json")) == EXPECTED_NODES


def test_node_state_flags_are_joined() -> None:
    doc = json.loads(golden(V2205 / "sinfo.json"))
    doc["nodes"][0].update(state="idle", state_flags=["DRAIN"])
    assert parse_nodes_json(json.dumps(doc))[0].state == "IDLE+DRAIN"
    doc = json.loads(golden(V2411 / "scontrol-show-nodes.json"))
    doc["nodes"][0]["state"] = ["IDLE", "DRAIN"]
    assert parse_nodes_json(json.dumps(doc))[0].state == "IDLE+DRAIN"
    text = (
        "NodeName=n9 NodeAddr=10.0.0.9 NodeHostName=c9 CPUTot=64 State=IDLE+DRAIN Reason=bad disk"
    )
    assert parse_scontrol_show_node(text) == (NodeInfo("n9", "10.0.0.9", "c9", "IDLE+DRAIN", 64),)


# --- state normalization and values -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "state", "flags"),
    [
        ("RUNNING", "RUNNING", ()),
        ("completed", "COMPLETED", ()),
        ("COMPLETING", "COMPLETING", ("COMPLETING",)),  # 22.05 shows the flag alone
        (["PENDING"], "PENDING", ()),
        (["COMPLETED", "COMPLETING"], "COMPLETING", ("COMPLETING",)),
        (["RUNNING", "CONFIGURING"], "CONFIGURING", ("CONFIGURING",)),
        (["FAILED", "STAGE_OUT", "COMPLETING"], "COMPLETING", ("STAGE_OUT", "COMPLETING")),
        (["PENDING", "REQUEUE_HOLD"], "REQUEUE_HOLD", ("REQUEUE_HOLD",)),
        (["NEW_BASE_STATE"], "NEW_BASE_STATE", ("NEW_BASE_STATE",)),
    ],
)
def test_state_normalization(value: object, state: str, flags: tuple[str, ...]) -> None:
    assert normalize_job_state(value) == (state, flags)


@pytest.mark.parametrize("value", [None, 5, [], [""], ["RUNNING", 3], "running!", {"a": 1}])
def test_bad_states_are_refused(value: object) -> None:
    with pytest.raises(SlurmError, match="job_state"):
        normalize_job_state(value)


def _edit_2411_job(**fields: Any) -> JobInfo:
    doc = json.loads(golden(V2411 / "squeue.json"))
    doc["jobs"][0].update(fields)
    return parse_squeue_json(json.dumps(doc)).jobs[0]


def _edit_2205_job(**fields: Any) -> JobInfo:
    doc = json.loads(golden(V2205 / "squeue.json"))
    doc["jobs"][0].update(fields)
    return parse_squeue_json(json.dumps(doc)).jobs[0]


def _exit(code: int | None = None, signal: int | None = None) -> dict[str, Any]:
    def number(value: int | None) -> dict[str, Any]:
        return {"set": value is not None, "infinite": False, "number": value or 0}

    return {"status": "ERROR", "return_code": number(code), "signal": {"id": number(signal)}}


def test_2411_exit_codes_and_finished_jobs() -> None:
    assert _edit_2411_job(job_state=["FAILED"], exit_code=_exit(code=3)).exit_code == 3
    killed = _edit_2411_job(job_state=["CANCELLED"], exit_code=_exit(code=0, signal=9))
    assert killed.exit_code == 137
    assert killed.finished
    assert _edit_2411_job(exit_code=_exit(code=3)).exit_code is None  # still running


def test_2205_exit_codes_are_wait_statuses() -> None:
    assert _edit_2205_job(job_state="FAILED", exit_code=3 << 8).exit_code == 3
    assert _edit_2205_job(job_state="CANCELLED", exit_code=9).exit_code == 137
    assert _edit_2205_job(job_state="COMPLETED", exit_code=0).exit_code == 0


def test_unset_and_infinite_numbers() -> None:
    unset = {"set": False, "infinite": False, "number": 0}
    infinite = {"set": False, "infinite": True, "number": 0}
    job = _edit_2411_job(end_time=infinite, start_time=unset, priority=unset)
    assert (job.end_time, job.start_time, job.priority) == (None, None, 0)
    job = _edit_2205_job(end_time=0xFFFFFFFE, start_time=0, priority=None)
    assert (job.end_time, job.start_time, job.priority) == (None, None, 0)


def test_array_tasks_and_hostlists() -> None:
    number = {"set": True, "infinite": False}
    job = _edit_2411_job(
        array_job_id={**number, "number": 40},
        array_task_id={**number, "number": 7},
        nodes="n[1-3]",
        scheduled_nodes="",
    )
    assert (job.array_job_id, job.array_task_id, job.nodes) == (40, 7, ("n1", "n2", "n3"))
    job = _edit_2205_job(array_job_id=40, array_task_id=7, nodes="gpu[01-02]")
    assert (job.array_job_id, job.array_task_id, job.nodes) == (40, 7, ("gpu01", "gpu02"))


def test_a_pending_arrays_record_keeps_its_remaining_tasks() -> None:
    """What `hpcstage status` shows as 40_[4-19%2], as squeue does."""
    unset = {"set": False, "infinite": False, "number": 0}
    job = _edit_2411_job(
        array_job_id={"set": True, "infinite": False, "number": 40},
        array_task_id=unset,
        array_task_string="4-19%2",
    )
    assert (job.array_job_id, job.array_task_id, job.array_tasks) == (40, None, "4-19%2")
    job = _edit_2205_job(array_job_id=40, array_task_id=None, array_task_string="[4-19]")
    assert (job.array_job_id, job.array_task_id, job.array_tasks) == (40, None, "4-19")
    assert _edit_2411_job().array_tasks == ""
    text = "JobId=40 ArrayJobId=40 ArrayTaskId=4-19 JobName=a UserId=bob(1002) JobState=PENDING"
    (job,) = parse_scontrol_show_job(text)
    assert (job.array_job_id, job.array_task_id, job.array_tasks) == (40, None, "4-19")
    (task,) = parse_scontrol_show_job(text.replace("ArrayTaskId=4-19", "ArrayTaskId=3"))
    assert (task.array_task_id, task.array_tasks) == (3, "")


# --- scontrol text ------------------------------------------------------------------------


def test_scontrol_values_with_spaces() -> None:
    text = (
        "JobId=7 ArrayJobId=5 ArrayTaskId=2 JobName=my job UserId=bob(1002) Account=bio "
        "Priority=12 JobState=FAILED Reason=NonZeroExitCode ExitCode=2:0 "
        "SubmitTime=2026-01-02T03:04:05 StartTime=Unknown EndTime=None NodeList=n[1-2] "
        "BatchHost=n1 Command=/home/bob/run it.sh WorkDir=/home/bob/a b "
        "Comment=hello world AdminComment=hpcstage:v1:in=s3://b/k;end Power=\n"
    )
    (job,) = parse_scontrol_show_job(text, tz=UTC)
    assert (job.job_id, job.array_job_id, job.array_task_id) == (7, 5, 2)
    assert (job.name, job.user, job.uid, job.account) == ("my job", "bob", 1002, "bio")
    assert (job.state, job.exit_code, job.finished) == ("FAILED", 2, True)
    assert (job.submit_time, job.start_time, job.end_time) == (1767323045.0, None, None)
    assert (job.nodes, job.work_dir, job.comment) == (("n1", "n2"), "/home/bob/a b", "hello world")
    assert job.admin_comment == "hpcstage:v1:in=s3://b/k;end"


def test_scontrol_multi_line_records() -> None:
    text = (
        "JobId=8 JobName=a\n   UserId=bob(1002) JobState=PENDING\n   SchedNodeList=n[3-4]\n"
        "\n"
        "JobId=9 JobName=b\n   UserId=bob(1002) JobState=COMPLETING\n"
    )
    jobs = parse_scontrol_show_job(text)
    assert [(j.job_id, j.state, j.planned_nodes) for j in jobs] == [
        (8, "PENDING", ("n3", "n4")),
        (9, "COMPLETING", ()),
    ]
    assert parse_scontrol_show_job("No jobs in the system\n") == ()


def test_squeue_start_nulls_and_array_forms() -> None:
    text = (
        "5|N/A|(null)\n"
        "6_3|2026-01-01T00:00:00|n1\n"
        "7_[1-9]|N/A|(null)\n"
        "8|2026-01-01T00:00:00|n[1-2]\n"
    )
    assert parse_squeue_start(text, tz=UTC) == (
        StartEstimate(5, None, ()),
        StartEstimate(8, 1767225600.0, ("n1", "n2")),
    )


# --- garbage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "squeue: error: Unable to contact slurm controller",
        "[]",
        "{}",
        '{"meta": {}}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.99"}}, "jobs": []}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": {}}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [5]}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [{"job_state": "RUNNING"}]}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [{"job_id": 1}]}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [{"job_id": true, '
        '"job_state": "RUNNING"}]}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [{"job_id": 1, '
        '"job_state": "RUNNING", "nodes": "n[1-"}]}',
        '{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "jobs": [{"job_id": 1, '
        '"job_state": "RUNNING", "priority": "high"}]}',
        '{"meta": {"plugin": {"data_parser": "data_parser/v0.0.42"}}, "jobs": [], '
        '"errors": [{"error": "Unable to contact slurm controller"}]}',
        "[" * 100_000,
    ],
)
def test_garbage_squeue_json_is_a_slurm_error(text: str) -> None:
    with pytest.raises(SlurmError):
        parse_squeue_json(text)


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "=x",
        "JobId=x JobState=RUNNING",
        "JobId=1",
        "JobId=1 JobState=RUNNING StartTime=tomorrow",
        "JobId=1 JobState=RUNNING ExitCode=x",
        "JobId=1 JobState=RUNNING NodeList=n[2-1]",
    ],
)
def test_garbage_scontrol_job_is_a_slurm_error(text: str) -> None:
    with pytest.raises(SlurmError):
        parse_scontrol_show_job(text)


@pytest.mark.parametrize("text", ["4|x|n2", "4|N/A", "x|N/A|(null)", "4|N/A|n[", "junk"])
def test_garbage_squeue_start_is_a_slurm_error(text: str) -> None:
    with pytest.raises(SlurmError):
        parse_squeue_start(text)


@pytest.mark.parametrize(
    "text", ['{"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "nodes": [{"state": "idle"}]}', "x"]
)
def test_garbage_nodes_are_a_slurm_error(text: str) -> None:
    with pytest.raises(SlurmError):
        parse_nodes_json(text)
    with pytest.raises(SlurmError):
        parse_scontrol_show_node("CPUTot=1 State=IDLE")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["set", "infinite", "number", "id", "x"]), children)
    ),
    max_leaves=8,
)
JOB_KEYS = sorted(json.loads(golden(V2411 / "squeue.json"))["jobs"][3])


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["22.05", "24.11"]), st.dictionaries(st.sampled_from(JOB_KEYS), json_values))
def test_any_field_value_gives_a_job_or_a_slurm_error(version: str, fields: dict[str, Any]) -> None:
    doc = json.loads(golden(GOLDEN / f"slurm-{version}" / "squeue.json"))
    doc["jobs"][3].update(fields)
    with contextlib.suppress(SlurmError):
        parse_squeue_json(json.dumps(doc))


# --- versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "release"),
    [
        ("slurm 24.11.1\n", "24.11.1"),
        ("slurm-wlm 22.05.8\n", "22.05.8"),
        ("slurm 23.02.0-0rc1", "23.02.0-0rc1"),
    ],
)
def test_version_output(text: str, release: str) -> None:
    assert parse_version_output(text) == release


def test_bad_version_output() -> None:
    with pytest.raises(SlurmError):
        parse_version_output("squeue: command not found")
    with pytest.raises(SlurmError):
        release_tuple("unknown")
    assert release_tuple("22.05.8") == (22, 5)


# --- CliBackend against fake commands -----------------------------------------------------


def fake_slurm(bin_dir: Path, version: str, **scripts: str) -> CliBackend:
    """Shell scripts standing in for Slurm's commands; each gets ``"$*"`` to dispatch on."""
    bin_dir.mkdir(exist_ok=True)
    scripts.setdefault("squeue", "")
    for name, body in scripts.items():
        path = bin_dir / name
        version_case = f'  --version) echo "slurm {version}";;\n' if name == "squeue" else ""
        path.write_text(f'#!/bin/sh\ncase "$*" in\n{version_case}{body}esac\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return CliBackend(bin_dir=str(bin_dir), timeout=5)


def test_backend_snapshot_on_2205_merges_squeue_start(tmp_path: Path) -> None:
    backend = fake_slurm(
        tmp_path / "bin",
        "22.05.8",
        squeue=(
            f'  "--json --all --states=all") cat {V2205 / "squeue.json"};;\n'
            f'  --start*"%A|%S|%Y"*) [ "$SLURM_TIME_FORMAT" = standard ] && '
            f"cat {V2205 / 'squeue-start.txt'};;\n"
        ),
    )
    snapshot = asyncio.run(backend.snapshot())
    assert snapshot.planned_nodes_known
    assert snapshot.taken_at > 0
    job4 = snapshot.job(4)
    assert job4 is not None
    assert job4.planned_nodes == ("n2",)


def test_backend_snapshot_on_2411_runs_one_command(tmp_path: Path) -> None:
    backend = fake_slurm(
        tmp_path / "bin",
        "24.11.7",
        squeue=f'  "--json --all --states=all") cat {V2411 / "squeue.json"};;\n  *) exit 3;;\n',
    )
    snapshot = asyncio.run(backend.snapshot())
    assert snapshot.jobs == EXPECTED_JOBS


@pytest.mark.parametrize(
    ("version", "command", "golden_file"),
    [
        ("22.05.8", "sinfo", V2205 / "sinfo.json"),
        ("24.11.7", "scontrol", V2411 / "scontrol-show-nodes.json"),
    ],
)
def test_backend_nodes_per_version(
    tmp_path: Path, version: str, command: str, golden_file: Path
) -> None:
    case = {"sinfo": "--json", "scontrol": "--json show nodes"}[command]
    backend = fake_slurm(
        tmp_path / "bin", version, **{command: f'  "{case}") cat {golden_file};;\n'}
    )
    assert asyncio.run(backend.nodes()) == list(EXPECTED_NODES)


def test_backend_batch_script(tmp_path: Path) -> None:
    backend = fake_slurm(
        tmp_path / "bin",
        "22.05.8",
        scontrol=(
            "  \"write batch_script 1 -\") printf '#!/bin/sh\\n#SBATCH --stage-in=/a\\n';;\n"
            '  "write batch_script 2 -") echo "job script retrieval failed: Invalid user id" >&2; '
            "exit 1;;\n"
            '  "write batch_script 3 -") echo "job script retrieval failed: Invalid job id '
            'specified" >&2; exit 1;;\n'
        ),
    )
    assert asyncio.run(backend.batch_script(1)) == "#!/bin/sh\n#SBATCH --stage-in=/a\n"
    assert asyncio.run(backend.batch_script(2)) is None
    with pytest.raises(SlurmError, match="Invalid job id specified"):
        asyncio.run(backend.batch_script(3))


def test_backend_failures_are_slurm_errors(tmp_path: Path) -> None:
    failing = fake_slurm(
        tmp_path / "bin",
        "22.05.8",
        squeue=(
            '  "--json --all --states=all")'
            ' echo "slurm_load_jobs error: Unable to contact" >&2; exit 1;;\n'
        ),
    )
    with pytest.raises(SlurmError, match=r"exit 1.*Unable to contact"):
        asyncio.run(failing.snapshot())
    missing = CliBackend(bin_dir=str(tmp_path / "nowhere"))
    with pytest.raises(SlurmError, match="cannot run"):
        asyncio.run(missing.version())


def test_backend_timeout_kills_the_command(tmp_path: Path) -> None:
    backend = fake_slurm(
        tmp_path / "bin", "22.05.8", squeue='  "--json --all --states=all") sleep 30;;\n'
    )
    slow = CliBackend(bin_dir=str(tmp_path / "bin"), timeout=0.3)
    assert asyncio.run(backend.version()) == "22.05.8"
    with pytest.raises(SlurmError, match="timed out"):
        asyncio.run(slow.snapshot())
