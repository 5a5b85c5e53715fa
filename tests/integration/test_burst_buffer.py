"""Strict mode on its own real dev cluster: burst_buffer/lua holds a job until its data is staged.

``DevCluster(burst_buffer=True)`` installs examples/slurm/burst_buffer.lua and .conf beside
slurm.conf (BurstBufferType=burst_buffer/lua) and job_submit.lua with STRICT = true; the
daemon's config is BASE/etc/hpcstage.toml, as burst_buffer.lua there expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import render
from devcluster.cluster import DevCluster

from .staging import (
    Stager,
    busy,
    make_dataset,
    parse_sums,
    private_cluster,
    running_stager,
    small_files,
    wait_until,
)

pytestmark = pytest.mark.integration

STRICT_JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}
echo "start=$(date +%s.%N)"
eval "$(hpcstage env)"
cd "$HPCSTAGE_DIR" && find . -type f | sort | xargs sha256sum
"""


@pytest.fixture(scope="module")
def bb_dev() -> Iterator[DevCluster]:
    """A dev cluster of its own in strict mode; stopped and removed at the end."""
    yield from private_cluster("bb", "hpcbb", burst_buffer=True)


@pytest.fixture(scope="module")
def stager(bb_dev: DevCluster) -> Iterator[Stager]:
    # burst_buffer.lua there expects BASE/etc/hpcstage.toml
    yield from running_stager(bb_dev, "bb", config_name="hpcstage.toml", concurrency=8)


@pytest.fixture
def strict(stager: Stager) -> Iterator[Stager]:
    """The strict-mode daemon, with this test's jobs cancelled afterwards."""
    yield stager
    stager.cancel_all()


def _reasons_until(stager: Stager, job: int, states: tuple[str, ...], timeout: float) -> list[str]:
    """The job's Reason at each poll until it reaches one of ``states``."""
    seen: list[str] = []

    def reached() -> bool:
        fields = stager.dev.job_state(job)
        if fields.get("JobState") == "PENDING":
            seen.append(fields.get("Reason", ""))
        return fields.get("JobState") in states

    wait_until(f"job {job} to reach {states}", reached, timeout, stager.log)
    return seen


def test_job_waits_in_stage_in_and_starts_only_after_its_data_is_there(strict: Stager) -> None:
    stager = strict
    src, sums = make_dataset(stager.dev, small_files(40))
    # Every node busy, n1 frees first: backfill plans the job there, which starts stage-in.
    busy(stager, "n1", 6, limit_min=1)
    busy(stager, "n2", 60, limit_min=3)
    busy(stager, "n3", 60, limit_min=3)
    job = stager.submit("alice", STRICT_JOB.format(src=src), "--account=chem")
    fields = stager.dev.job_state(job)
    assert fields.get("BurstBuffer") == "#BB_LUA", fields  # "#BB_LUA hpcstage", split
    reasons = _reasons_until(stager, job, ("RUNNING", "COMPLETED", "FAILED"), 90)
    assert "BurstBufferStageIn" in reasons, reasons
    assert stager.dev.wait_job(job, timeout=60) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    name = src.rstrip("/").rsplit("/", 1)[1]
    assert parse_sums(out) == {f"{name}/{k}": v for k, v in sums.items()}, out
    started = float(out.splitlines()[0].removeprefix("start="))
    doc = stager.doc(job)
    node = doc["nodes"][0]
    # Slurm ran the job's first line only once the daemon had every input on its node.
    assert doc["ready_at"][node] <= started, (doc["ready_at"], started)


def test_failed_stage_in_holds_the_job_with_the_cause(strict: Stager) -> None:
    stager = strict
    src = f"s3://datasets/nothing-{uuid.uuid4().hex[:6]}/receptor.pdb"
    for node in stager.dev.info.nodes:  # keep it pending, so that backfill plans it
        busy(stager, node, 60, limit_min=2)
    job = stager.submit("bob", f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\necho RAN\n")
    found: dict[str, str] = {}

    def held() -> bool:
        found.update(stager.dev.job_state(job))
        return found.get("Priority") == "0"

    wait_until(f"job {job} held", held, 60, stager.log)
    assert found["JobState"] == "PENDING", found
    reason = found["Reason"].replace("_", " ")
    assert "slurm bb data in" in reason and src in reason and "no such object" in reason, found
    time.sleep(1)
    assert not (stager.dev.workdir("bob") / f"{job}.out").exists()  # it never ran


def test_bbstat_shows_a_job_to_its_owner_only(strict: Stager) -> None:
    """Issue 15 item 6: the hook runs `hpcstage status` as SlurmUser, an admin of the API, so
    `scontrol show bbstat JOB` showed anyone any job. Bob asks for Alice's job."""
    stager = strict
    src = f"s3://datasets/chem/secret-{uuid.uuid4().hex[:6]}/"
    job = stager.submit("alice", f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n", "--hold")
    stager.wait_doc(job, "known to the daemon", lambda d: d["job_id"] == job)
    bob = stager.dev.run_as("bob", ["scontrol", "show", "bbstat", str(job)], check=False)
    assert src not in bob.stdout + bob.stderr, bob
    assert "alice" not in bob.stdout + bob.stderr, bob
    alice = stager.dev.run_as("alice", ["scontrol", "show", "bbstat", str(job)], check=False)
    if render.parse_slurm_version(stager.dev.info.slurm_version) >= (24, 5):  # hook told who asks
        assert src in alice.stdout, alice
        assert "belongs to another user" in bob.stdout, bob
    else:  # 22.05 does not: nobody's status through bbstat, and the way that works instead
        assert src not in alice.stdout and "hpcstage status" in alice.stdout, alice


def test_jobs_without_directives_are_not_burst_buffer_jobs(strict: Stager) -> None:
    stager = strict
    job = stager.submit("bob", "#!/bin/bash\necho plain\n")
    assert stager.dev.wait_job(job, timeout=60) == "COMPLETED"
    assert stager.output("bob", job).strip() == "plain"
    assert stager.dev.job_state(job).get("BurstBuffer") in (None, "(null)")


# --- the hooks on their own, under lua5.1, for both of Slurm's calling conventions --------

LUA = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "burst_buffer.lua"
FAKE_HPCSTAGE = """#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
  status) cat "$FAKE_DIR/doc.json" ;;
  env) if [ -e "$FAKE_DIR/env_fails" ]; then
         echo "hpcstage: job 7 cannot start: s3://d/x: no such object" >&2; exit 1
       fi
       echo "export HPCSTAGE_DIR=/cache/jobs/7" ;;
esac
"""
DRIVER = """
slurm = { SUCCESS = 0, ERROR = -1, log_info = function() end }
if NEW_API then slurm.SLURM_BB_BUSY = "BUSY" end
local text = io.open(LUA_PATH):read("*a")
for old, new in pairs(SETTINGS) do
  local s, e = text:find(old, 1, true)
  assert(s, old)
  text = text:sub(1, s - 1) .. new .. text:sub(e + 1)
end
assert(loadstring(text))()
local out = {}
for _, call in ipairs(CALLS) do
  local rc, msg = _G[call[1]](unpack(call, 2))
  out[#out + 1] = tostring(rc) .. "|" .. tostring(msg)
end
print(table.concat(out, "\\n"))
"""


def _lua_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for these values


def _run_hooks(tmp: Path, new_api: bool, doc: dict[str, object], calls: str) -> list[str]:
    fake = tmp / "hpcstage"
    fake.write_text(FAKE_HPCSTAGE)
    fake.chmod(0o755)
    (tmp / "doc.json").write_text(json.dumps(doc))
    script = tmp / "bb.lua"
    job = tmp / "script"
    job.write_text("#!/bin/bash\n#BB_LUA hpcstage\ntrue\n")
    settings = {
        'local HPCSTAGE = "/opt/hpcstage/bin/hpcstage"': f"local HPCSTAGE = {_lua_str(str(fake))}",
        'local CACHE_DIR = "/local/hpcstage"': 'local CACHE_DIR = "/c/{node}"',
        "local UNPLANNED_GRACE = 20": "local UNPLANNED_GRACE = 0",
        "local STAGE_IN_WAIT = 3600": "local STAGE_IN_WAIT = 1",
        "local PRE_RUN_WAIT = 1800": "local PRE_RUN_WAIT = 2",
        "local POLL = 2": "local POLL = 0",
    }
    lua_settings = ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in settings.items())
    script.write_text(
        f"NEW_API = {'true' if new_api else 'false'}\nLUA_PATH = {_lua_str(str(LUA))}\n"
        f"SETTINGS = {{{lua_settings}}}\nJOB = {_lua_str(str(job))}\n"
        f"PATHS = {_lua_str(str(tmp / 'paths'))}\nCALLS = {{{calls}}}\n{DRIVER}"
    )
    done = subprocess.run(
        ["lua5.1", str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "FAKE_DIR": str(tmp)},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _doc() -> dict[str, object]:
    return {"planned_nodes": ["n1"], "nodes": [], "staging": {}, "failure": "", "error": None}


@pytest.mark.parametrize("new_api", [False, True], ids=["22.05", "24.05+"])
def test_hooks_follow_slurms_conventions(tmp_path: Path, new_api: bool) -> None:
    staging = {**_doc(), "staging": {"n1": "staging"}}
    ready = {**_doc(), "staging": {"n1": "ready"}, "nodes": ["n1"]}
    failed = {**_doc(), "failure": "s3://d/x: no such object"}
    every = (
        '{"slurm_bb_job_process", JOB, 0, 0, {}}, {"slurm_bb_pools"},'
        ' {"slurm_bb_setup", "7", 0, 0, "", 0, JOB, {}}, {"slurm_bb_real_size", "7"},'
        ' {"slurm_bb_post_run", "7", JOB}, {"slurm_bb_data_out", "7", JOB},'
        ' {"slurm_bb_test_data_out", "7", JOB}, {"slurm_bb_job_teardown", "7", JOB, "false"}'
    )
    assert _run_hooks(tmp_path, new_api, ready, every) == [
        "0|nil",
        "0|nil",
        "0|nil",
        "0|nil",
        "0|nil",
        "0|nil",
        "0|",
        "0|nil",
    ]
    data_in = '{"slurm_bb_data_in", "7", JOB, 0, 0, {}}'
    test_in = '{"slurm_bb_test_data_in", "7", JOB, 0, 0, {}}'
    if new_api:  # data_in returns, test_data_in polls: BUSY, then done
        assert _run_hooks(tmp_path, new_api, staging, f"{data_in}, {test_in}") == [
            "0|nil",
            "0|BUSY",
        ]
        assert _run_hooks(tmp_path, new_api, ready, test_in) == ["0|"]
    else:  # data_in waits (bounded) and fails the stage-in when the time is up
        [line] = _run_hooks(tmp_path, new_api, staging, data_in)
        assert line.startswith("-1|hpcstage: inputs not staged after 1s"), line
        assert _run_hooks(tmp_path, new_api, ready, data_in) == ["0|nil"]
    [line] = _run_hooks(tmp_path, new_api, failed, data_in)
    assert line == "-1|hpcstage: s3://d/x: no such object", line


@pytest.mark.parametrize("new_api", [False, True], ids=["22.05", "24.05+"])
def test_bbstat_asks_as_the_uid_slurm_names_never_as_one_typed(
    tmp_path: Path, new_api: bool
) -> None:
    """24.05+ passes the asker's uid and gid as text before the words typed; 22.05 passes
    only the words, so "bbstat 0 0 7" there must not be read as uid 0 asking for job 7."""
    (tmp_path / "calls").touch()
    calls = '{"slurm_bb_get_status", "1001", "1001", "7"}, {"slurm_bb_get_status", "0", "0", "7"}'
    lines = _run_hooks(tmp_path, new_api, _doc(), calls)
    asked = (tmp_path / "calls").read_text()
    if new_api:
        assert "status --config /etc/hpcstage/site.toml --for-uid 1001 7" in asked, asked
        assert "--for-uid 0 " in asked  # root asking is root (an admin anyway)
        assert lines[0].startswith("0|{"), lines
    else:
        assert asked == "", asked  # the daemon is not asked at all
        said = [line for line in lines if line]
        assert len(said) == 2 and all("run `hpcstage status" in line for line in said), lines


def test_paths_and_pre_run(tmp_path: Path) -> None:
    ready = {**_doc(), "staging": {"n1": "ready"}, "nodes": ["n1"]}
    calls = (
        '{"slurm_bb_paths", "7", JOB, PATHS, 0, 0, {nodes = "n1"}},'
        ' {"slurm_bb_pre_run", "7", JOB, 0, 0, {nodes = "n1"}}'
    )
    assert _run_hooks(tmp_path, True, ready, calls) == ["0|nil", "0|nil"]
    assert (tmp_path / "paths").read_text() == (
        "HPCSTAGE_DIR=/c/n1/jobs/7\nHPCSTAGE_MOUNTS=/c/n1/jobs/7,/c/n1/packed\n"
    )
    assert (
        "env --config /etc/hpcstage/site.toml --job 7 --node n1" in (tmp_path / "calls").read_text()
    )
    (tmp_path / "env_fails").touch()
    [_, line] = _run_hooks(tmp_path, True, ready, calls)
    assert line == "-1|hpcstage: job 7 cannot start: s3://d/x: no such object", line


def test_jobs_of_other_burst_buffer_users_pass_through(tmp_path: Path) -> None:
    calls = '{"slurm_bb_data_in", "7", "/nonexistent", 0, 0, {}}'
    (tmp_path / "calls").touch()
    assert _run_hooks(tmp_path, False, {**_doc(), "failure": "x"}, calls) == ["0|nil"]
    assert (tmp_path / "calls").read_text() == ""  # the daemon was not even asked


def test_a_dropped_node_is_not_waited_for(tmp_path: Path) -> None:
    # The daemon dropped the planned node (its own failure): staging there will not happen
    # unless the job runs there, so stage-in must not wait for it (it would wait forever).
    dropped = {**_doc(), "staging": {"n1": "dropped"}}
    test_in = '{"slurm_bb_test_data_in", "7", JOB, 0, 0, {}}'
    assert _run_hooks(tmp_path, True, dropped, test_in) == ["0|"]
