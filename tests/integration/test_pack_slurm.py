"""``hpcstage pack --slurm`` on the real dev cluster: the slices packed by a 4-task job array
and merged by a dependent job make the same version, byte for byte, as one process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pwd
import uuid

import pyarrow.parquet as pq
import pytest

from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin
from hpcstage.core.packed import VersionInfo, manifest_key, version_key

pytestmark = pytest.mark.integration

BUCKET = "datasets"


def _get(dev: DevCluster, key: str) -> bytes:
    async def get() -> bytes:
        async with dev.s3_client() as s3:
            answer = await s3.get_object(Bucket=BUCKET, Key=key)
            async with answer["Body"] as body:
                data: bytes = await body.read()
                return data

    return asyncio.run(get())


def _version(dev: DevCluster, prefix: str) -> tuple[VersionInfo, pq.Table]:
    info = VersionInfo.from_json(_get(dev, prefix + version_key(1)), prefix)
    return info, pq.read_table(io.BytesIO(_get(dev, prefix + manifest_key(1))))


def test_a_slurm_array_pack_makes_the_same_version_as_one_process(cluster: DevCluster) -> None:
    wd = cluster.workdir("alice")
    src = wd / f"pack-src-{uuid.uuid4().hex[:6]}"
    alice = pwd.getpwnam("alice")
    for i in range(1200):
        path = src / f"set{i % 5}" / f"{i:05d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(200 + i % 900))
    for path in [src, *src.rglob("*")]:
        os.chown(path, alice.pw_uid, alice.pw_gid)
    info = cluster.info
    env = {
        "AWS_ACCESS_KEY_ID": info.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
    }
    common = ["--endpoint-url", info.s3_endpoint, "--segment-size", "64K", "--slice-files", "200"]
    base = f"pack-{uuid.uuid4().hex[:8]}/"
    array_dest, single_dest = f"{base}array.hpack/", f"{base}single.hpack/"
    submitted = cluster.run_as(
        "alice",
        [hpcstage_bin(), "pack", str(src), f"s3://{BUCKET}/{array_dest}", *common,
         "--slurm", "--tasks", "4", "--wait", "--json", "--log-dir", str(wd)],
        env=env, timeout=180,
    )  # fmt: skip
    events = [json.loads(line) for line in submitted.stdout.splitlines()]
    jobs = next(e for e in events if e["event"] == "submitted")
    assert events[-1] == {"event": "merged", "version": 1}
    cluster.run_as(
        "alice",
        [hpcstage_bin(), "pack", str(src), f"s3://{BUCKET}/{single_dest}", *common, "--json"],
        env=env, timeout=120,
    )  # fmt: skip
    array_info, array_rows = _version(cluster, array_dest)
    single_info, single_rows = _version(cluster, single_dest)
    assert array_rows.num_rows == 1200
    assert array_rows.equals(single_rows)
    assert array_info.segments == single_info.segments
    assert len({s.name.split("-")[1] for s in array_info.segments}) == 6  # slices
    assert array_info.manifest_sha256 == single_info.manifest_sha256
    # Each of the 4 tasks logged what it packed.
    logs = sorted(wd.glob(f"hpack-1-{jobs['array_job']}_*.out"))
    assert len(logs) == 4, logs
    assert all("segments written" in log.read_text() for log in logs)
