"""What bounds a pack the daemon runs: its wall-clock limit (limits.pack_time_limit) and the
room its spool needs on the daemon's host (core.packing.spool_refusal).

The limit is tested on the daemon's real pack runner (staging.packs.Packs) with a real child
process that never finishes, standing in for a pack stuck on a slow store: the runner must
stop it, free the slot and say why in the pack's record.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.load import parse_config
from hpcstage.core.packing import SPOOL_MARGIN, PackRequest, spool_refusal
from hpcstage.db import Pack, open_db
from hpcstage.staging.packs import Packs

SRC, DEST = "s3://datasets/chem/lig/", "s3://results/chem/lig.hpack/"
MIB = 2**20

# A pack that reports progress once, writes its pid where the test finds it, and then hangs.
HANGING = textwrap.dedent(
    """
    import json, os, sys, time
    spool = sys.argv[sys.argv.index("--spool") + 1]
    with open(os.path.join(spool, "..", "child.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(json.dumps({"event": "progress", "files_done": 1}), flush=True)
    time.sleep(600)
    """
)


def test_a_spool_with_room_for_the_segments_lets_a_pack_start() -> None:
    assert spool_refusal(2 * 256 * MIB + SPOOL_MARGIN, 256 * MIB, 2) == ""


def test_a_spool_without_room_names_what_is_free_and_what_is_needed() -> None:
    said = spool_refusal(100 * MIB, 256 * MIB, 2)
    assert "100MiB free for it" in said
    assert "576MiB" in said  # two segments of 256 MiB and the margin
    assert "--segment-size" in said


@pytest.fixture
def db() -> Iterator[sessionmaker[Session]]:
    found = open_db("sqlite://")
    yield found
    found.kw["bind"].dispose()


def _packs(tmp_path: Path, db: sessionmaker[Session], limit: str, script: Path) -> Packs:
    settings = parse_config(
        f'[site]\nname = "t"\nstate_dir = "{tmp_path}"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
        f'[limits]\npack_time_limit = "{limit}"\n'
    )
    return Packs(
        settings, db, lambda *a, **k: None, lambda _id: None, (sys.executable, str(script))
    )


async def _until_ended(packs: Packs, db: sessionmaker[Session], pack_id: int) -> Pack:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db() as session:
            row = session.get_one(Pack, pack_id)
            if row.state in ("done", "failed"):
                return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"pack {pack_id} did not end within 60 s")


def test_a_pack_past_the_time_limit_is_stopped_and_fails_saying_why(
    tmp_path: Path, db: sessionmaker[Session]
) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANGING)

    async def scenario() -> tuple[Pack, int, bool]:
        packs = _packs(tmp_path, db, "2s", script)
        pack_id = packs.create(PackRequest(SRC, DEST), "alice", admin=True)
        row = await _until_ended(packs, db, pack_id)
        running = bool(packs._tasks)
        await packs.close()
        return row, pack_id, running

    row, pack_id, still_running = asyncio.run(scenario())
    assert row.state == "failed"
    assert "limits.pack_time_limit" in row.error
    assert "resumes it" in row.error
    assert not still_running  # the slot is free for the next pack
    pid = int((tmp_path / "packs" / "child.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child was stopped, not left behind
    assert not (tmp_path / "packs" / str(pack_id)).exists()  # nor its spool


def test_a_pack_whose_segments_do_not_fit_the_spool_fails_before_it_starts(
    tmp_path: Path, db: sessionmaker[Session]
) -> None:
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the child must not be started')\n")
    asked: list[Path] = []

    def nearly_full(path: Path) -> int:  # the daemon host's disk, with 300 MiB left
        asked.append(path)
        return 300 * MIB

    async def scenario() -> Pack:
        packs = _packs(tmp_path, db, "1h", script)
        packs.free_bytes = nearly_full
        pack_id = packs.create(PackRequest(SRC, DEST, segment_size="256M"), "alice", admin=True)
        row = await _until_ended(packs, db, pack_id)
        await packs.close()
        return row

    row = asyncio.run(scenario())
    assert row.state == "failed"
    assert "300MiB free for it" in row.error and "--segment-size" in row.error
    assert row.attempts == 0  # refused before a child ran
    assert asked == [tmp_path / "packs" / "1"]  # the spool's own file system was asked


def test_a_second_pack_counts_the_room_the_running_one_may_still_take(
    tmp_path: Path, db: sessionmaker[Session]
) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANGING)

    async def scenario() -> tuple[Pack, Pack]:
        packs = _packs(tmp_path, db, "1h", script)
        packs.free_bytes = lambda path: 700 * MIB  # room for one pack of 256 MiB segments
        first = packs.create(PackRequest(SRC, DEST), "alice", admin=True)
        other = "s3://results/chem/other.hpack/"
        second = packs.create(PackRequest(SRC, other), "alice", admin=True)
        refused = await _until_ended(packs, db, second)
        with db() as session:
            running = session.get_one(Pack, first)
        await packs.close()
        return running, refused

    running, refused = asyncio.run(scenario())
    assert running.state == "running"
    assert refused.state == "failed" and "124MiB free for it" in refused.error
