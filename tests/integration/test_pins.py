"""`hpcstage pin` on the real dev cluster: a dataset kept warm on a node through eviction
pressure, refreshed on its schedule, kept across a daemon restart, and released by `pin rm`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin
from hpcstage.cache.layout import object_path

from .staging import Stager, make_dataset, running_stager, small_files, wait_until, with_tiny_cache

pytestmark = pytest.mark.integration

KiB = 1024


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "pins", edit=with_tiny_cache)


def _admin(stager: Stager, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI as root (an admin: api.admins), from a directory root may enter."""
    argv = [hpcstage_bin(), *args]
    return stager.dev.run_as("root", argv, env=stager.env(), check=check, cwd=Path("/"))


def _cache_of(stager: Stager, node: str) -> Path:
    return Path(stager.dev.info.base) / "nodes" / node / "cache"


def _cached(stager: Stager, node: str, src: str) -> dict[str, str]:
    """key -> cache_id of what NODE's cache index holds under SRC (read-only, as root)."""
    prefix = src.removeprefix("s3://datasets/")
    index = _cache_of(stager, node) / "index.db"
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT key, cache_id FROM objects WHERE bucket = 'datasets' AND substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
    return {key.removeprefix(prefix): cache_id for key, cache_id in rows}


def _hashes(stager: Stager, node: str, cached: dict[str, str]) -> dict[str, str]:
    objects = _cache_of(stager, node) / "objects"
    return {
        rel: hashlib.sha256(object_path(objects, cid).read_bytes()).hexdigest()
        for rel, cid in cached.items()
    }


def _pins(stager: Stager) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(_admin(stager, "pin", "ls", "--json").stdout)
    return found


def _pin(stager: Stager, pin_id: int) -> dict[str, Any]:
    (doc,) = [p for p in _pins(stager) if p["id"] == pin_id]
    return doc


def _usage(stager: Stager, node: str) -> dict[str, int]:
    usage: dict[str, int] = json.loads(_admin(stager, "cache", "ls", node, "--json").stdout)[
        "usage"
    ]
    return usage


def test_only_admins_pin(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(2, size=64))
    refused = stager.cli("alice", "pin", "add", src, "--nodes", "n1", check=False)
    assert refused.returncode == 1
    assert "only admins may keep datasets warm" in refused.stderr
    listing = stager.cli("alice", "pin", "ls", check=False)
    assert listing.returncode == 1
    assert "only admins" in listing.stderr
    schedule = ("--schedule", "0 6 * * MON")
    bad = _admin(stager, "pin", "add", src, "--nodes", "n1", *schedule, check=False)
    assert bad.returncode == 1
    assert "schedule: day of week: 'mon' is not a number" in bad.stderr
    assert not [p for p in _pins(stager) if p["src"] == src]  # nothing recorded


def test_a_pinned_prefix_outlives_eviction_is_refreshed_and_released(stager: Stager) -> None:
    src, sums = make_dataset(stager.dev, small_files(32, size=8 * KiB))  # 256 KiB
    added = _admin(stager, "pin", "add", src, "--nodes", "n1", "--schedule", "every 30s")
    found = re.search(r"pin (\d+): ", added.stdout)
    assert found, added.stdout
    pin_id = int(found.group(1))

    def warm(files: int) -> bool:
        doc = _pin(stager, pin_id)
        return doc["state"] == "warm" and doc["staging"]["n1"]["files"] == files

    wait_until("the pinned prefix staged on n1", lambda: warm(32), 180, stager.log)
    assert _hashes(stager, "n1", _cached(stager, "n1", src)) == sums
    view = _cache_of(stager, "n1") / "jobs" / f"pin-{pin_id}"
    assert len([p for p in view.rglob("*") if p.is_file()]) == 32  # the links: its lease
    table = _admin(stager, "pin", "ls").stdout.splitlines()
    assert table[1].split()[:3] == [str(pin_id), "warm", "n1"], table

    # Pressure: 768 KiB more, unpinned, fills the 1 MiB cache over its high watermark.
    other, _ = make_dataset(stager.dev, small_files(96, size=8 * KiB))
    stager.cli("alice", "warmup", other, "--nodes", "n1", "--json")
    done = stager.client.post("/api/v1/nodes/n1/evict")  # the test runs as root: an admin
    assert done["evicted"] > 0
    # The unpinned data went (down to the low watermark, 512 KiB, of which 256 KiB pinned);
    # every pinned object is still there, intact.
    assert len(_cached(stager, "n1", other)) <= 32
    assert _hashes(stager, "n1", _cached(stager, "n1", src)) == sums
    assert _usage(stager, "n1")["leased_bytes"] >= 32 * 8 * KiB

    # The schedule: a new object under the prefix is fetched at the next refresh (30 s).
    name = src.removeprefix("s3://datasets/").rstrip("/")
    _, new = make_dataset(stager.dev, {"late.dat": b"x" * 4 * KiB}, under=name)
    wait_until("the scheduled refresh to fetch the new object", lambda: warm(33), 240, stager.log)
    doc = _pin(stager, pin_id)
    assert doc["last_refresh_at"] is not None
    assert doc["next_refresh_at"] > doc["last_refresh_at"]
    assert _hashes(stager, "n1", _cached(stager, "n1", src)) == {**sums, **new}
    assert [p.name for p in view.rglob("late.dat")] == ["late.dat"]  # linked: leased too

    # A restarted daemon still keeps it (the pins are in its database).
    stager.stop()
    stager.start()
    assert _pin(stager, pin_id)["state"] in ("warm", "staging")

    leased = _usage(stager, "n1")["leased_bytes"]
    removed = _admin(stager, "pin", "rm", str(pin_id))
    assert f"pin {pin_id}: no longer kept warm" in removed.stdout
    wait_until("the pin's lease to end on n1", lambda: not view.exists(), 120, stager.log)
    assert [p["id"] for p in _pins(stager)] == []
    assert _usage(stager, "n1")["leased_bytes"] <= leased - 32 * 8 * KiB
    refused = _admin(stager, "pin", "rm", str(pin_id), check=False)
    assert refused.returncode == 1
    assert "not kept warm" in refused.stderr
