"""Stage-in before allocation, on the real dev cluster, with the daemon as the service account.

Every test runs twice: with the default SQLite state and with PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster
from devcluster.site import start_daemon, stop_daemon

from .staging import (
    CHECKSUM_JOB,
    Stager,
    big_files,
    busy,
    fetched_on,
    make_dataset,
    parse_sums,
    running_stager,
    scratch_database,
    small_files,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stager(
    request: pytest.FixtureRequest, cluster: DevCluster, pg_admin_url: str
) -> Iterator[Stager]:
    backend = request.param
    with contextlib.ExitStack() as stack:
        state_url = ""
        if backend == "postgresql":
            state_url = stack.enter_context(scratch_database(pg_admin_url, "stagein"))
        yield from running_stager(cluster, f"stagein-{backend}", state_url=state_url, concurrency=8)


@pytest.fixture(autouse=True)
def _clean_jobs(stager: Stager) -> Iterator[None]:
    yield
    stager.cancel_all()


def test_inputs_are_staged_onto_the_planned_node_before_the_job_starts(stager: Stager) -> None:
    files = {**small_files(60, prefix="small/"), "big/one.bin": os.urandom(3 << 20)}
    src, sums = make_dataset(stager.dev, files)
    # Every node busy; n1 frees first (shortest time limit), so backfill plans the job there.
    # n1 is filled last, so the whole of its 20 s is left for planning and staging even when
    # a loaded machine takes seconds to start each busy job.
    busy(stager, "n2", 45, limit_min=3)
    busy(stager, "n3", 45, limit_min=3)
    busy(stager, "n1", 20, limit_min=1)
    dest = src.rstrip("/").rsplit("/", 1)[1]
    job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest), "--account=chem")
    doc = stager.wait_doc(
        job,
        "staged on its planned node while pending",
        lambda d: d["state"] == "PENDING" and "ready" in d["staging"].values(),
    )
    assert doc["planned_nodes"], doc
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert parse_sums(out) == sums, out
    # The daemon sees the job run a poll after Slurm does (on a loaded machine, after it ended).
    doc = stager.wait_doc(job, "seen running by the daemon", lambda d: bool(d["nodes"]))
    node = doc["nodes"][0]
    assert f"node={node}" in out
    # The daemon's records: every input was ready on that node before Slurm started the job.
    assert doc["ready_at"][node] <= doc["started_at"], doc
    assert fetched_on(doc, node) == len(files)


def test_two_jobs_on_one_node_fetch_each_object_once(stager: Stager) -> None:
    files = small_files(120)
    src, sums = make_dataset(stager.dev, files)
    hold = busy(stager, "n2", 8)
    dest = src.rstrip("/").rsplit("/", 1)[1]
    script = CHECKSUM_JOB.format(src=src, dest=dest)
    jobs = [stager.submit("alice", script, "--nodelist=n2", "--account=chem") for _ in range(2)]
    for job in (hold, *jobs):
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    docs = [stager.doc(job) for job in jobs]
    for job in jobs:
        assert parse_sums(stager.output("alice", job)) == sums
    # Counted by the agents: one GET per object on n2, however many jobs needed it.
    assert sum(fetched_on(doc, "n2") for doc in docs) == len(files), docs


def test_missing_object_fails_the_job_at_env_with_the_directive(stager: Stager) -> None:
    src = f"s3://datasets/nothing-{uuid.uuid4().hex[:6]}/receptor.pdb"
    # The README's usage: the reason is in the job's output once (issue 19: it was twice,
    # from hpcstage's stderr and from the `echo ... >&2` it printed for the shell).
    env = 'eval "$(hpcstage env || echo exit 1)"'
    script = f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n{env}\necho RAN\n"
    job = stager.submit("bob", script, "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out
    assert src in out and "no such object" in out, out
    assert out.count(f"hpcstage: job {job} cannot start") == 1, out
    status = stager.cli("bob", "status", str(job)).stdout
    assert src in status and "no such object" in status, status


def test_malformed_directive_is_refused_and_named(stager: Stager) -> None:
    script = (
        "#!/bin/bash\n#HPCSTAGE --stage-in=s3://datasets/ok/\n"
        "#HPCSTAGE --stage-in=s3://datasets/../etc/passwd\n"
        'eval "$(hpcstage env)"\necho RAN\n'
    )
    job = stager.submit("bob", script, "--account=bio")
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out
    assert "s3://datasets/../etc/passwd" in out and "refused" in out, out
    status = stager.cli("bob", "status", str(job)).stdout
    assert "REFUSED" in status and "s3://datasets/../etc/passwd" in status, status
    assert stager.doc(job)["requests"] == []  # nothing of a refused job is ever staged


@pytest.mark.parametrize("victim", ["daemon", "agent"])
def test_kill_9_mid_stage_in_resumes_without_refetching(stager: Stager, victim: str) -> None:
    count, size = 64, 32 << 20  # 2 GiB in 32 MiB objects
    src, _ = big_files(stager.dev, count, size)
    hold = busy(stager, "n3", 600, limit_min=15)
    dest = src.rstrip("/").rsplit("/", 1)[1]
    job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest), "--nodelist=n3")
    stager.wait_doc(
        job, "part of the stage-in done", lambda d: _files_done(d, "n3") >= 12, timeout=180
    )
    cache = stager.dev.info.node_cache("n3")
    if victim == "daemon":
        stager.stop(hard=True)
    else:
        os.kill(_agent_pid(stager.dev, "n3"), signal.SIGKILL)
    wait_until("the n3 agent to be gone", lambda: not _agent_pids(stager.dev, "n3"), 30, None)
    key_prefix = src.removeprefix("s3://datasets/")
    before = _committed(cache, key_prefix)
    assert 0 < len(before) < count, "the kill should land mid-transfer"
    view = cache / "jobs" / str(job)
    _assert_no_partial_files(view, size)
    if victim == "daemon":
        stager.start()
    doc = stager.wait_doc(
        job, "staged after the restart", lambda d: d["staging"].get("n3") == "ready", timeout=240
    )
    _assert_no_partial_files(view, size)
    assert len(list(view.rglob("*.bin"))) == count
    # Objects verified and committed before the kill were not fetched again.
    assert _committed(cache, key_prefix) >= before
    assert fetched_on(doc, "n3") == count - len(before), (len(before), doc)
    proc.run(["scancel", str(hold)], env=stager.dev.client_env())
    assert stager.dev.wait_job(job, timeout=240) == "COMPLETED"
    assert len(parse_sums(stager.output("alice", job))) == count


def test_a_job_waiting_in_hpcstage_env_outlives_a_daemon_restart(stager: Stager) -> None:
    files = small_files(8, prefix="restart/")
    src, sums = make_dataset(stager.dev, files)
    stager.stop()  # down (restarting, an HA takeover) when the job starts and asks
    try:
        dest = src.rstrip("/").rsplit("/", 1)[1]
        job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest))
        wait_until(
            "the job to find the daemon gone",
            lambda: "asking again until it answers" in _output_or_empty(stager, job),
            120,
            None,
        )
    finally:
        stager.start()
    assert stager.dev.wait_job(job, timeout=180) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert "cannot reach the hpcstage daemon" in out and "the daemon answers again" in out
    assert parse_sums(out) == sums


def _output_or_empty(stager: Stager, job: int) -> str:
    try:
        return stager.output("alice", job)
    except FileNotFoundError:
        return ""


def _files_done(doc: dict[str, object], node: str) -> int:
    return sum(r["nodes"].get(node, {}).get("files_done", 0) for r in doc["requests"])  # type: ignore[attr-defined, index]


def _agent_pids(dev: DevCluster, node: str) -> list[int]:
    out = proc.run(
        ["pgrep", "-f", f"agent --node {node} --cache-dir {dev.info.base}/"], check=False
    ).stdout
    return [int(p) for p in out.split()]


def _agent_pid(dev: DevCluster, node: str) -> int:
    pids = _agent_pids(dev, node)
    assert pids, f"no agent running for {node}"
    return pids[0]


def _committed(cache: Path, key_prefix: str) -> set[str]:
    """Keys the node cache holds verified (index row written after the atomic rename)."""
    with contextlib.closing(sqlite3.connect(cache / "index.db")) as db:
        rows = db.execute("SELECT key FROM objects WHERE key LIKE ?", (key_prefix + "%",))
        return {key for (key,) in rows}


def _assert_no_partial_files(view: Path, size: int) -> None:
    for path in view.rglob("*"):
        if path.is_file():
            assert path.stat().st_size == size, f"partial file visible in the view: {path}"
            assert ".tmp" not in path.name, path


def test_a_shared_filesystem_directory_is_staged_too(stager: Stager) -> None:
    shared = Path(stager.dev.info.base) / "shared" / f"set-{uuid.uuid4().hex[:6]}"
    (shared / "sub").mkdir(parents=True)
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(70_000)}
    for rel, body in files.items():
        (shared / rel).write_bytes(body)
    (shared / "escape").symlink_to("/etc/passwd")  # leaves the shared tree: never staged
    for path in [shared.parent, shared, shared / "sub"]:
        path.chmod(0o755)
    job = stager.submit("alice", CHECKSUM_JOB.format(src=f"{shared}/", dest=shared.name))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    got = parse_sums(stager.output("alice", job))
    assert got == {rel: hashlib.sha256(body).hexdigest() for rel, body in files.items()}


def test_a_second_daemon_stands_by_and_takes_over_when_the_first_dies(stager: Stager) -> None:
    log = Path(stager.dev.info.base) / "log" / f"standby-{uuid.uuid4().hex[:6]}.log"
    second = start_daemon(stager.dev, stager.config, log.name)
    try:
        wait_until(
            "the second daemon to stand by",
            lambda: "standing by: another hpcstage daemon is active" in log.read_text(),
            60,
            log,
        )
        assert "active: this daemon holds" not in log.read_text()
        assert stager.client.get("/api/v1/health")["last_tick"]  # still the first's API
        stager.stop(hard=True)  # the active daemon dies
        wait_until(
            "the standby to take over",
            lambda: "active: this daemon holds" in log.read_text(),
            60,
            log,
        )
        stager.pid, second = second, 0
        wait_until("the new daemon's API", stager._healthy, 60, log)
        # And it acts: a job's inputs are staged by it.
        src, sums = make_dataset(stager.dev, small_files(5))
        dest = src.rstrip("/").rsplit("/", 1)[1]
        job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest))
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
        assert parse_sums(stager.output("alice", job)) == sums
        # A daemon standing by stops at once on SIGTERM (it holds nothing to drain).
        log_third = log.with_name(log.name.replace("standby", "third"))
        second = start_daemon(stager.dev, stager.config, log_third.name)
        wait_until(
            "a third daemon to stand by",
            lambda: "standing by" in log_third.read_text(),
            60,
            log_third,
        )
        os.kill(second, signal.SIGTERM)
        wait_until("the standby to exit", lambda: not proc.alive(second), 15, log_third)
        second = 0
        said = log_third.read_text()
        assert "Traceback" not in said and "never awaited" not in said, said
    finally:
        if second:
            stop_daemon(second)
