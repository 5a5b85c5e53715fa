"""Elastic cloud nodes (Slurm power saving): a job Slurm gives a powered-down node waits on
the cache cluster while the node boots, and the node copies its inputs from there once up.

The cluster is this module's own: its node c1 is ``State=CLOUD`` in partition "cloud",
booted by a ResumeProgram that starts its slurmd (and stopped by a SuspendProgram), so the
shared cluster's nodes never sleep. BASE/power/hold keeps the "boot" waiting while the test
looks at what the daemon did meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster

from .staging import (
    CHECKSUM_JOB,
    Stager,
    fetched_on,
    make_dataset,
    parse_sums,
    private_cluster,
    running_stager,
    small_files,
    wait_until,
)

pytestmark = pytest.mark.integration

CLOUD_NODE = "c1"
CACHE_NODE = "n3"
POLL = 1.0  # the daemon's slurm.poll_interval in the test config (devcluster/site.py)


@pytest.fixture(scope="module")
def elastic() -> Iterator[DevCluster]:
    yield from private_cluster(
        "elastic", "hpcelastic", cloud_nodes=(CLOUD_NODE,), s3_log_requests=True
    )


def _power_saving(text: str) -> str:
    assert text.count("[cache]\n") == 1 and text.count("[slurm]\n") == 1
    text = text.replace("[cache]\n", f'[cache]\ncluster_nodes = ["{CACHE_NODE}"]\n')
    return text.replace("[slurm]\n", "[slurm]\npower_saving = true\n")


@pytest.fixture(scope="module")
def stager(elastic: DevCluster) -> Iterator[Stager]:
    yield from running_stager(elastic, "elastic", edit=_power_saving, concurrency=8)


def _node_state(dev: DevCluster, node: str) -> str:
    out = proc.run(["scontrol", "show", "node", "-o", node], env=dev.client_env()).stdout
    fields = dict(token.partition("=")[::2] for token in out.split())
    return fields.get("State", "")


def _hold(dev: DevCluster) -> Path:
    return Path(dev.info.base) / "power" / "hold"


def test_a_job_on_a_powered_down_node_waits_on_the_cache_node_and_copies_from_there(
    stager: Stager,
) -> None:
    dev = stager.dev
    assert "POWERED_DOWN" in _node_state(dev, CLOUD_NODE)
    files = small_files(60, size=3000)
    src, sums = make_dataset(dev, files)
    dest = src.rstrip("/").rsplit("/", 1)[1]
    _hold(dev).touch()  # the node's "boot" waits until the test lets it go
    try:
        script = CHECKSUM_JOB.format(src=src, dest=dest)
        job = stager.submit(
            "alice", script, "--partition=cloud", f"--nodelist={CLOUD_NODE}", "--account=chem"
        )
        stager.wait_doc(
            job,
            "staged on the cache node, and seen on its node, which boots",
            lambda d: d["staging"].get(CACHE_NODE) == "ready" and d["state"] == "CONFIGURING",
            timeout=300,
        )
        time.sleep(5 * POLL)  # a few more ticks: nothing may happen on c1 meanwhile
        doc = stager.doc(job)
        # Slurm gave the job c1 and runs ResumeProgram: c1 is booting, has no agent, and
        # the daemon neither staged it nor failed or dropped it.
        assert "POWERING_UP" in _node_state(dev, CLOUD_NODE)
        assert CLOUD_NODE not in doc["staging"], doc
        assert fetched_on(doc, CACHE_NODE) == len(files)
    finally:
        _hold(dev).unlink(missing_ok=True)

    assert dev.wait_job(job, timeout=300) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    assert f"node={CLOUD_NODE}" in out
    assert parse_sums(out) == sums, out
    doc = stager.doc(job)
    # The store was asked for each object once (counted by the S3 server), by the cache
    # node; the booted node copied every one of them from there.
    assert dev.s3_gets("datasets", f"{dest}/") == {f"{dest}/{rel}": 1 for rel in files}
    assert sum(fetched_on(doc, node) for node in doc["staging"]) == len(files), doc
    assert fetched_on(doc, CLOUD_NODE) == 0, doc
    events = str(doc["events"])
    assert f"copied {len(files)} objects" in events and f"from {CACHE_NODE}'s cache" in events
    # The cache node's view (its lease) was let go once the job's node was up.
    assert doc["staging"][CACHE_NODE] == "released", doc


def test_the_suspend_program_powers_the_node_off_again(stager: Stager) -> None:
    dev = stager.dev
    log = Path(dev.info.base) / "log" / "slurmctld.log"
    if "POWERED_DOWN" in _node_state(dev, CLOUD_NODE):  # booted by the test before, or not
        _scontrol(dev, "update", f"nodename={CLOUD_NODE}", "state=power_up")
    wait_until(f"{CLOUD_NODE} up", lambda: _up(_node_state(dev, CLOUD_NODE)), 180, log)
    slurmd = proc.read_pid(Path(dev.info.base) / "run" / f"slurmd-{CLOUD_NODE}.pid")

    _scontrol(dev, "update", f"nodename={CLOUD_NODE}", "state=power_down")

    wait_until(f"{CLOUD_NODE}'s slurmd stopped", lambda: not proc.alive(slurmd), 120, log)
    wait_until(
        f"{CLOUD_NODE} powered down",
        lambda: "POWERED_DOWN" in _node_state(dev, CLOUD_NODE),
        120,
        log,
    )


def _up(state: str) -> bool:
    return state.startswith("IDLE") and "POWER" not in state


def _scontrol(dev: DevCluster, *args: str) -> None:
    proc.run(["scontrol", *args], env=dev.client_env())
