"""``hpcstage pack`` against a real S3 server (rclone): a directory and an S3 prefix packed and
read back byte-exact, ``--update`` that keeps the old version readable, and a pack killed with
SIGKILL that resumes without uploading its finished segments again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hpcstage.core.packed import SUFFIX, VersionInfo
from hpcstage.errors import PackError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.pack import Packer, PackSettings
from hpcstage.packed.sources import DirSource, S3Source
from hpcstage.store.s3 import S3Store
from tests.contract.conftest import BUCKET, S3Server, make_s3_store

pytestmark = pytest.mark.anyio

LONG = "/".join(["d" * 120] * 3) + "/" + "f" * 200  # needs a pax header


@pytest.fixture
async def store(s3_server: S3Server) -> AsyncIterator[S3Store]:
    async with make_s3_store(s3_server, list_page_size=1000) as s:
        yield s


def _tree(root: Path, files: dict[str, bytes]) -> None:
    made: set[Path] = set()
    for path, data in files.items():
        where = root / path
        if where.parent not in made:
            where.parent.mkdir(parents=True, exist_ok=True)
            made.add(where.parent)
        with open(where, "wb") as fh:
            fh.write(data)


def _source_files() -> dict[str, bytes]:
    files = {f"set{i % 7}/sub{i % 3}/{i:05d}.sdf": os.urandom(i % 300) for i in range(2000)}
    files.update({"big/one.bin": os.urandom(3 * 2**20 + 5), "big/two.bin": os.urandom(700_000)})
    files.update({"empty": b"", "a.txt": b"a before a/", "a/x": b"x", LONG: b"long path"})
    return files


async def _read_all(store: S3Store, prefix: str, version: int | None = None) -> dict[str, bytes]:
    dataset = PackedDataset(store, prefix)
    info = await dataset.record(version)
    out: dict[str, bytes] = {}
    async for batch in dataset.select(info, ""):
        by_segment: dict[str, list] = {}
        for m in batch:
            by_segment.setdefault(m.segment, []).append(m)
        for name, members in by_segment.items():
            ref = await dataset.segment_ref(info, name)
            for m, data in zip(members, await dataset.read_members(ref, members), strict=True):
                out[m.path] = data
    return out


def _settings(**kw: object) -> PackSettings:
    base: dict[str, object] = {"segment_size": 256 * 2**10, "slice_files": 1000, "jobs": 2}
    base.update(kw)
    return PackSettings(**base)  # type: ignore[arg-type]


async def _pack_dir(
    store: S3Store, prefix: str, root: Path, spool: Path, **kw: object
) -> VersionInfo:
    spool.mkdir(exist_ok=True)
    packer = Packer(store, prefix, DirSource(root), spool, _settings(**kw))
    info, _ = await packer.run()
    return info


async def test_a_directory_packs_and_reads_back_byte_exact(store: S3Store, tmp_path: Path) -> None:
    files = _source_files()
    _tree(tmp_path / "src", files)
    (tmp_path / "src" / "link").symlink_to("a.txt")
    os.mkfifo(tmp_path / "src" / "fifo")
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    spool = tmp_path / "spool"
    spool.mkdir()
    packer = Packer(store, prefix, DirSource(tmp_path / "src"), spool, _settings())
    info, plan = await packer.run()
    assert (info.version, info.files, info.size) == (1, len(files), sum(map(len, files.values())))
    assert plan.skipped == 2  # the symlink and the FIFO
    assert len(plan.slices) == 3 and len(info.segments) > 4
    assert await _read_all(store, prefix) == files
    assert await packer.verify(info) == sum(s.size for s in info.segments)
    assert [o.key async for o in store.list(prefix + "_pack/")] == []  # work files removed
    assert list(spool.iterdir()) == []


async def test_update_packs_what_changed_and_keeps_the_old_version(
    store: S3Store, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    old = {f"d/{i:04d}": os.urandom(100 + i) for i in range(500)}
    _tree(root, old)
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    first = await _pack_dir(store, prefix, root, tmp_path / "s")
    new = dict(old)
    new["d/0003"] = b"changed"
    new["d/9999"] = b"added"
    new["c/new"] = b"added before d/"
    del new["d/0100"]
    (root / "d/0100").unlink()
    for path in ("d/0003", "d/9999", "c/new"):
        _tree(root, {path: new[path]})
    second = await _pack_dir(store, prefix, root, tmp_path / "s", update=True)
    assert (second.version, second.parent, second.files) == (2, 1, len(new))
    written = {s.name for s in second.segments if s.name.startswith("00000002-")}
    assert sum(s.files for s in second.segments if s.name in written) == 3
    assert {s.name for s in first.segments} <= {s.name for s in second.segments}
    assert await _read_all(store, prefix, 1) == old
    assert await _read_all(store, prefix, 2) == new
    # Nothing changed since: no third version.
    again = await _pack_dir(store, prefix, root, tmp_path / "s", update=True)
    assert again.version == 2
    assert await PackedDataset(store, prefix).versions() == [1, 2]


async def test_an_s3_prefix_packs(store: S3Store, tmp_path: Path) -> None:
    base = f"p-{uuid.uuid4().hex[:8]}/"
    files = {f"raw/{i:03d}.dat": os.urandom(i * 11) for i in range(120)}
    files["raw/large.bin"] = os.urandom(2 * 2**20)
    for path, data in files.items():
        (tmp_path / "f").write_bytes(data)
        await store.upload(tmp_path / "f", base + "in/" + path)
    spool = tmp_path / "spool"
    spool.mkdir()
    source = S3Source(store, base + "in/", spool, fetchers=4)
    prefix = base + f"out/lib{SUFFIX}/"
    info, plan = await Packer(store, prefix, source, spool, _settings()).run()
    assert (info.files, plan.skipped) == (len(files), 0)
    assert info.source == f"s3://{BUCKET}/{base}in/"
    assert await _read_all(store, prefix) == files


async def test_a_pending_pack_of_another_source_is_not_mixed_in(
    store: S3Store, tmp_path: Path
) -> None:
    for name in ("one", "two"):
        _tree(tmp_path / name, {"f": name.encode()})
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    (tmp_path / "s").mkdir()
    first = Packer(store, prefix, DirSource(tmp_path / "one"), tmp_path / "s", _settings())
    await first.plan()  # planned, then "killed"
    other = Packer(store, prefix, DirSource(tmp_path / "two"), tmp_path / "s", _settings())
    with pytest.raises(PackError, match="pending pack of"):
        await other.run()
    restart = _settings(restart=True)
    other = Packer(store, prefix, DirSource(tmp_path / "two"), tmp_path / "s", restart)
    await other.run()
    assert await _read_all(store, prefix) == {"f": b"two"}


def _segment_files(server: S3Server, prefix: str) -> dict[str, tuple[int, int]]:
    seg_dir = server.data_dir / BUCKET / prefix / "segments"
    if not seg_dir.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in seg_dir.iterdir()}


def _done_parts(server: S3Server, prefix: str) -> list[str]:
    """The segments marked done: those with a part manifest."""
    parts = server.data_dir / BUCKET / prefix / "_pack" / "00000001" / "parts"
    found = parts.iterdir() if parts.is_dir() else iter(())
    return sorted(p.name.removesuffix(".parquet") + ".tar" for p in found)


async def test_a_pack_killed_midway_resumes(
    s3_server: S3Server, store: S3Store, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    files = {f"d{i % 10}/{i:05d}": os.urandom(1000 + i % 500) for i in range(2000)}
    _tree(root, files)
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    dest = f"s3://{BUCKET}/{prefix}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "TMPDIR": str(tmp_path),
    }
    argv = [sys.executable, "-m", "hpcstage", "pack", str(root), dest, "--endpoint-url",
            s3_server.endpoint, "--segment-size", "64K", "--jobs", "1", "--json"]  # fmt: skip
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while (
        len(_done_parts(s3_server, prefix)) < 3
        and first.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the pack ended before it could be killed"
    finished = _done_parts(s3_server, prefix)
    before = _segment_files(s3_server, prefix)
    assert len(finished) >= 3 and set(finished) <= set(before)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["event"] == "done" and summary["files"] == len(files)
    assert summary["segments_resumed"] == len(finished)
    assert summary["segments_written"] == summary["segments"] - len(finished)
    after = _segment_files(s3_server, prefix)
    for name in finished:
        assert after[name] == before[name], f"{name} was uploaded again"
    assert await _read_all(store, prefix) == files
    info = await PackedDataset(store, prefix).record()
    assert {s.name for s in info.segments} == set(after)


async def test_a_pack_whose_plan_was_replaced_does_not_commit(
    store: S3Store, tmp_path: Path
) -> None:
    _tree(tmp_path / "src", {"f": b"one"})
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    (tmp_path / "s").mkdir()
    first = Packer(store, prefix, DirSource(tmp_path / "src"), tmp_path / "s", _settings())
    work, plan, _ = await first.plan()
    await first.pack_slices(work, plan, 0, 1)
    _tree(tmp_path / "src", {"g": b"two"})
    restart = _settings(restart=True)
    (tmp_path / "s2").mkdir()
    await Packer(store, prefix, DirSource(tmp_path / "src"), tmp_path / "s2", restart).plan()
    with pytest.raises(PackError, match="planned version 1 again"):
        await first.merge(work, plan)
    assert await PackedDataset(store, prefix).versions() == []


async def test_a_pack_takes_no_number_a_jobs_packed_stage_out_is_writing(
    store: S3Store, tmp_path: Path
) -> None:
    # A job's packed stage-out has uploaded a segment of version 1 and not its record yet:
    # a pack must not write its segments under the same names (it would replace the job's).
    files = _source_files()
    _tree(tmp_path / "src", files)
    prefix = f"p-{uuid.uuid4().hex[:8]}/lib{SUFFIX}/"
    held = prefix + "segments/00000001-00000-000000.tar"
    (tmp_path / "theirs").write_bytes(b"the job's segment")
    await store.upload(tmp_path / "theirs", held)
    info = await _pack_dir(store, prefix, tmp_path / "src", tmp_path / "spool")
    assert info.version == 2
    assert await _read_all(store, prefix) == files
    listing = [o async for o in store.list(held)]
    assert [o.size for o in listing] == [len(b"the job's segment")]
