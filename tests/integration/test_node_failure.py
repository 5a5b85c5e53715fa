"""A node that cannot be staged is dropped from a pending job's targets, not the job: with the
node Slurm planned out of reach for good, the job starts on another node and gets its data
there (issue: real clusters, failure isolation).

The node is made unreachable through the agent command: a wrapper that, while a marker file
names the node, fails the way ssh does when a node's sshd is gone (exit 255, nothing said on
stdout). Every node of the dev cluster shares one sshd, so stopping sshd would cut them all.
"""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster import proc
from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin

from .staging import (
    CHECKSUM_JOB,
    Stager,
    busy,
    make_dataset,
    parse_sums,
    running_stager,
    small_files,
)

pytestmark = pytest.mark.integration

WRAPPER = """#!/bin/sh
# The agent command of this test's daemon: "unreachable" while {marks}/down-NODE exists.
node=""
prev=""
for arg in "$@"; do
    [ "$prev" = "--node" ] && node="$arg"
    prev="$arg"
done
if [ -e "{marks}/down-$node" ]; then
    echo "ssh: connect to host $node port 22: Connection refused" >&2
    exit 255
fi
exec {hpcstage} agent "$@"
"""


@pytest.fixture(scope="module")
def marks(cluster: DevCluster) -> Path:
    found = Path(cluster.info.base) / "run" / f"marks-{uuid.uuid4().hex[:6]}"
    found.mkdir(mode=0o755)
    return found


@pytest.fixture(scope="module")
def stager(cluster: DevCluster, marks: Path) -> Iterator[Stager]:
    wrapper = Path(cluster.info.base) / "etc" / f"agent-wrapper-{marks.name}"
    wrapper.write_text(WRAPPER.format(marks=marks, hpcstage=hpcstage_bin()))
    wrapper.chmod(0o755 | stat.S_IRUSR)

    def with_wrapper(text: str) -> str:
        line = f'agent_command = "{hpcstage_bin()} agent"'
        assert line in text
        return text.replace(line, f'agent_command = "{wrapper}"')

    yield from running_stager(cluster, "nodefail", edit=with_wrapper)


def test_a_job_whose_planned_node_is_unreachable_starts_elsewhere_with_its_data(
    stager: Stager, marks: Path
) -> None:
    files = small_files(40, prefix="lig/")
    src, sums = make_dataset(stager.dev, files)
    down = marks / "down-n3"
    down.touch()
    try:
        # Every node busy; n3's time limit ends first, so backfill plans the job there. The
        # busy jobs' sleeps outlast their limits' order: n1 is freed by hand below.
        held = {n: busy(stager, n, 240, limit_min=4) for n in ("n1", "n2")}
        busy(stager, "n3", 240, limit_min=2)
        dest = src.rstrip("/").rsplit("/", 1)[1]
        job = stager.submit("alice", CHECKSUM_JOB.format(src=src, dest=dest), "--account=chem")
        doc = stager.wait_doc(
            job,
            "n3 dropped from its targets after its last attempt",
            lambda d: d["staging"].get("n3") == "dropped",
            timeout=150,
        )
        assert doc["planned_nodes"] == ["n3"], doc
        assert doc["failure"] == "" and doc["state"] == "PENDING", doc
        assert any("n3 dropped from the job's nodes" in e["message"] for e in doc["events"])
        # The site notices the node is gone and frees another: Slurm starts the job on n1.
        proc.run(["scancel", str(held["n1"])], env=stager.dev.client_env())
        assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
        out = stager.output("alice", job)
        assert "node=n1" in out, out
        assert parse_sums(out) == sums, out
    finally:
        down.unlink(missing_ok=True)
        stager.cancel_all()
