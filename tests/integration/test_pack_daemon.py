"""``hpcstage pack --daemon`` on the real dev cluster: a scientist with no S3 credentials has
the daemon pack a prefix the policy lets them read into a dataset they may write; whoever
the policy does not allow is refused by name; a daemon killed mid-pack resumes it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files, wait_until

pytestmark = pytest.mark.integration

POLICY = """default = "deny"

[[policy.rules]]
users = ["alice"]
read = ["s3://datasets/chem/", "s3://results/chem/"]
write = ["s3://results/chem/", "s3://results/dropbox/"]
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "packd", policy=POLICY)


def _pack(stager: Stager, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return stager.cli(user, "pack", "--daemon", *args, check=False)


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _read_all(dev: DevCluster, dataset: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """SHA-256 of every file of the dataset's newest version, read from S3 (fsspec hpack)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", dev.info.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", dev.info.s3_secret_key)
    fs = fsspec.filesystem(
        "hpack", dataset=dataset, endpoint_url=dev.info.s3_endpoint, skip_instance_cache=True
    )
    out = {}
    for path in fs.find(""):
        with fs.open(path) as f:
            out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_user_without_s3_keys_has_the_daemon_pack_what_they_may_read(
    stager: Stager, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"set{i % 3}/{i:04d}.sdf": os.urandom(100 + i) for i in range(300)}
    src, sums = make_dataset(stager.dev, files, under=f"chem/{uuid.uuid4().hex[:6]}")
    dest = f"s3://results/chem/{uuid.uuid4().hex[:6]}.hpack/"
    # alice's environment holds no AWS keys: packing here fails, the daemon's way works.
    assert "AWS_ACCESS_KEY_ID" not in stager.env()
    done = _pack(stager, "alice", src, dest, "--json", "--segment-size", "64K")
    assert done.returncode == 0, done.stderr
    lines = _lines(done.stdout)
    assert lines[-1]["event"] == "done", lines[-1]
    assert (lines[-1]["version"], lines[-1]["files"]) == (1, 300)
    assert lines[-1]["segments"] >= 2  # 64 KiB segments: the files spread over several
    assert any(line["event"] == "progress" for line in lines[:-1])
    assert _read_all(stager.dev, dest, monkeypatch) == sums
    # Nothing changed: --update writes nothing and says so.
    again = _pack(stager, "alice", src, dest, "--update", "--segment-size", "64K")
    assert again.returncode == 0, again.stderr
    assert "version 1 is up to date" in again.stdout


@pytest.mark.parametrize(
    ("user", "src", "dest", "said"),
    [
        ("bob", "s3://datasets/chem/x/", "s3://results/chem/x.hpack/", "no policy rule grants"),
        ("alice", "s3://datasets/bio/x/", "s3://results/chem/x.hpack/", "read access"),
        ("alice", "s3://datasets/chem/x/", "s3://results/bio/x.hpack/", "read access"),
        # Write-only (a drop box): a pack reads the dataset's versions, so it needs read too.
        ("alice", "s3://datasets/chem/x/", "s3://results/dropbox/x.hpack/", "read access"),
        ("alice", "s3://datasets/chem/x/", "s3://datasets/chem/x/y.hpack/", "must not hold"),
        ("alice", "s3://datasets/chem/x/", "s3://results/chem/x/", "NAME.hpack"),
        ("alice", "s3://datasets/chem/../bio/", "s3://results/chem/x.hpack/", "'..'"),
    ],
)
def test_a_pack_the_policy_does_not_allow_is_refused_with_the_reason(
    stager: Stager, user: str, src: str, dest: str, said: str
) -> None:
    refused = _pack(stager, user, src, dest)
    assert refused.returncode != 0
    assert said in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_pack_survives_the_daemon_being_killed_and_resumes(
    stager: Stager, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = small_files(3000, size=2048)
    src, sums = make_dataset(stager.dev, files, under=f"chem/{uuid.uuid4().hex[:6]}")
    dest = f"s3://results/chem/{uuid.uuid4().hex[:6]}.hpack/"
    started = stager.client.post("/api/v1/packs", {"src": src, "dest": dest, "segment_size": "64K"})
    path = f"/api/v1/packs/{started['id']}"

    def some_segments_written() -> bool:
        doc = stager.client.get(path)
        assert doc["state"] in ("queued", "running"), doc
        return bool(doc["progress"] and doc["progress"]["segments"] >= 3)

    wait_until("the pack to write segments", some_segments_written, 120, stager.log)
    children = _pack_processes(dest)
    assert children, "the pack runs as a child of the daemon"
    stager.stop(hard=True)
    # The child dies with the daemon (no orphan racing the next daemon's resumed pack).
    wait_until("the pack child to die", lambda: not _pack_processes(dest), 30, stager.log)
    stager.start()

    def ended() -> bool:
        return str(stager.client.get(path)["state"]) in ("done", "failed")

    wait_until("the resumed pack to end", ended, 180, stager.log)
    doc = stager.client.get(path)
    assert doc["state"] == "done", doc
    assert doc["attempts"] == 2
    assert doc["summary"]["segments_resumed"] >= 3
    assert doc["summary"]["files"] == 3000
    assert _read_all(stager.dev, dest, monkeypatch) == sums


def _pack_processes(dest: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"pack" in argv and dest.encode() in argv:
            found.append(int(entry))
    return found


def test_another_user_cannot_follow_a_pack(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(5), under=f"chem/{uuid.uuid4().hex[:6]}")
    dest = f"s3://results/chem/{uuid.uuid4().hex[:6]}.hpack/"
    done = _pack(stager, "alice", src, dest, "--json")
    assert done.returncode == 0, done.stderr
    queued = _lines(done.stdout)[0]
    assert queued["event"] == "queued"
    asked = [f"/api/v1/packs/{queued['id']}", f"/api/v1/packs/{queued['id'] + 1000}"]
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hpcstage.cli.client import client_for\n"
        "from hpcstage.cli.common import load_client\n"
        "from hpcstage.errors import ApiError\n"
        f"client = client_for(load_client(Path({str(stager.config)!r})))\n"
        f"for path in {asked!r}:\n"
        "    try:\n"
        "        client.get(path)\n"
        "        print('200')\n"
        "    except ApiError as exc:\n"
        "        print(exc.status, exc)\n"
    )
    seen = stager.dev.run_as("bob", [sys.executable, "-c", code], env=stager.env(), check=False)
    assert seen.returncode == 0, seen.stderr
    answers = seen.stdout.splitlines()
    assert answers[0].startswith("403") and "belongs to another user" in answers[0], answers
    assert answers[1].startswith("404"), answers
