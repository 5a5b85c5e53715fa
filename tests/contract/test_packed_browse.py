"""Reading a packed dataset in place on a real S3 server (rclone): `hpcstage ls`, `hpcstage cat`
and the fsspec `hpack` filesystem, as a user with their own credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import fsspec
import pytest

from hpcstage.core.packed import segment_name
from hpcstage.packed.segments import SegmentWriter
from hpcstage.packed.writer import VersionWriter
from tests.contract.conftest import BUCKET, S3Server, make_s3_store

FILES = {
    **{f"set1/{i:04d}.sdf": f"ligand {i}\n".encode() * (i % 7) for i in range(120)},
    **{f"set2/sub/{i:03d}.sdf": os.urandom(300 + i) for i in range(40)},
    "README": b"top-level file\n",
}


@pytest.fixture
def dataset(s3_server: S3Server, tmp_path: Path) -> str:
    prefix = f"b-{uuid.uuid4().hex[:8]}/lib.hpack/"

    async def write() -> None:
        store = make_s3_store(s3_server)
        try:
            for version in (1, 2):
                names = sorted(FILES)
                seg = [
                    SegmentWriter(tmp_path / f"s{version}{k}", segment_name(version, 0, k))
                    for k in (0, 1)
                ]
                half = len(names) // 2
                members = [
                    seg[0 if i < half else 1].add(
                        p, FILES[p] + (b"v2" if version == 2 else b""), 0o640, 10**18
                    )
                    for i, p in enumerate(names)
                ]
                writer = VersionWriter(store, prefix, version, tmp_path, row_group=16)
                for s in seg:
                    await writer.upload_segment(s.finish())
                await writer.commit([members])
        finally:
            await store.close()

    anyio.run(write)
    return f"s3://{BUCKET}/{prefix}"


def _cli(s3_server: S3Server, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
    }
    env.pop("HPCSTAGE_CONFIG", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "hpcstage"), *args],
        capture_output=True,
        env=env,
        check=False,
    )


def test_ls_lists_a_directory_and_versions(s3_server: S3Server, dataset: str) -> None:
    top = _cli(s3_server, "ls", dataset)
    assert top.returncode == 0, top.stderr
    assert top.stdout.decode().split() == ["README", "set1/", "set2/"]
    sub = _cli(s3_server, "ls", f"{dataset[:-1]}@1/set2/sub/")
    assert sub.stdout.decode().split() == sorted(
        p.rsplit("/", 1)[1] for p in FILES if p.startswith("set2/sub/")
    )
    deep = _cli(s3_server, "ls", "-r", dataset + "set1/")
    assert deep.stdout.decode().split() == sorted(p for p in FILES if p.startswith("set1/"))
    versions = _cli(s3_server, "ls", "--versions", dataset)
    assert [line.split()[0] for line in versions.stdout.decode().splitlines()] == ["@1", "@2"]
    missing = _cli(s3_server, "ls", dataset + "nope/")
    assert missing.returncode != 0
    assert b"no such file or directory" in missing.stderr


def test_cat_writes_verified_bytes_of_the_version_asked(s3_server: S3Server, dataset: str) -> None:
    path = "set2/sub/007.sdf"
    old = _cli(s3_server, "cat", f"{dataset[:-1]}@1/{path}")
    assert old.returncode == 0, old.stderr
    assert old.stdout == FILES[path]
    new = _cli(s3_server, "cat", dataset + path)
    assert new.stdout == FILES[path] + b"v2"
    gone = _cli(s3_server, "cat", dataset + "set1/nothing")
    assert gone.returncode != 0
    assert b"no such file" in gone.stderr


def test_fsspec_lists_and_opens_files(
    s3_server: S3Server, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.delenv("HPCSTAGE_CONFIG", raising=False)
    fs = fsspec.filesystem("hpack", dataset=dataset[:-1] + "@1/", endpoint_url=s3_server.endpoint)
    assert fs.ls("", detail=False) == ["README", "set1", "set2"]
    assert fs.isdir("set2/sub")
    assert fs.isfile("set1/0003.sdf")
    assert fs.info("set1/0003.sdf")["size"] == len(FILES["set1/0003.sdf"])
    with fs.open("set1/0003.sdf") as fh:
        assert fh.read() == FILES["set1/0003.sdf"]
    assert fs.cat("README") == FILES["README"]
    with pytest.raises(FileNotFoundError):
        fs.open("set1/none")
    with pytest.raises(PermissionError):
        fs.open("README", "wb")
