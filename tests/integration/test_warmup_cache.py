"""`hpcstage warmup` and `hpcstage cache` on the real dev cluster, with eviction by policy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster
from hpcstage.cache.layout import object_path

from .staging import Stager, make_dataset, running_stager, small_files, with_tiny_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "warmup", edit=with_tiny_cache)


def test_warmup_fills_the_nodes_caches_and_holds_no_lease(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(64, size=8192))  # 512 KiB
    done = stager.cli("alice", "warmup", src, "--nodes", "n[1-2]", "--json")
    doc = json.loads(done.stdout)
    # "released": the warmup's directory is dropped right away; the data stays cached.
    assert {doc["staging"][n] for n in ("n1", "n2")} <= {"ready", "released"}, doc["staging"]
    for node in ("n1", "n2"):
        row = json.loads(stager.cli("alice", "cache", "ls", node, "--json").stdout)
        assert row["usage"]["bytes"] >= 64 * 8192
        assert row["usage"]["objects"] >= 64
    listing = stager.cli("alice", "cache", "usage", "--nodes", "n1").stdout
    assert listing.splitlines()[1].startswith("n1")


def test_warmup_draws_its_progress_and_says_when_the_nodes_are_warm(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(8, size=1024))
    done = stager.cli("alice", "warmup", src, "--nodes", "n1")
    assert f"warm on n1: {src}" in done.stdout
    assert "n1 8/8 files" in done.stdout  # the bar's last state, as a terminal would show it


def test_warmup_of_a_missing_prefix_fails_with_the_reason(stager: Stager) -> None:
    failed = stager.cli(
        "alice", "warmup", "s3://datasets/never-uploaded/", "--nodes", "n1", "--json", check=False
    )
    assert failed.returncode == 1
    assert "no objects under s3://datasets/never-uploaded/" in failed.stderr


def test_eviction_brings_an_overfull_cache_below_the_low_watermark(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(160, size=8192))  # 1.25 MiB > 1 MiB
    stager.cli("alice", "warmup", src, "--nodes", "n3", "--json")
    before = json.loads(stager.cli("alice", "cache", "ls", "n3", "--json").stdout)["usage"]
    assert before["bytes"] > 0.9 * 2**20
    refused = stager.cli("alice", "cache", "evict", "--nodes", "n3", check=False)
    assert refused.returncode == 1  # admins only
    assert "only admins" in refused.stderr
    done = stager.client.post("/api/v1/nodes/n3/evict")  # the test runs as root: an admin
    assert done["evicted"] > 0
    after = json.loads(stager.cli("alice", "cache", "ls", "n3", "--json").stdout)["usage"]
    # Unleased data went down to the low watermark (or to nothing, if other tests' jobs still
    # lease more than that); leased data is never evicted.
    assert after["bytes"] - after["leased_bytes"] <= 0.5 * 2**20
    assert after["leased_bytes"] == before["leased_bytes"]
    assert after["bytes"] < before["bytes"]


def test_a_long_polling_status_request_answers_when_the_warmup_finishes(
    stager: Stager,
) -> None:
    src, _ = make_dataset(stager.dev, small_files(16, size=4096))
    warm = stager.client.post("/api/v1/warmups", {"src": src, "nodes": ["n2"]})["id"]
    path = f"/api/v1/warmups/{warm}"
    doc = stager.client.get(path)
    answered, asked = time.time(), 0
    while not doc["requests"][0]["nodes"].get("n2", {}).get("finished_at"):
        asked += 1
        assert asked < 30, doc
        doc = stager.client.get(f"{path}?since={doc['changes']}&wait=8")
        answered = time.time()
    st = doc["requests"][0]["nodes"]["n2"]
    assert st["state"] in ("ready", "released") and st["files_done"] == 16, st
    # The answer came when the staging finished, not at the end of its 8 s wait.
    assert answered - st["finished_at"] < 6, (answered, st["finished_at"])
    # The daemon then releases the warmup (its staging says "released", then the job is
    # marked done: one more change); after that nothing changes it: a request that asks to
    # wait does wait, then answers the same.
    while doc["staging"]["n2"] != "released":
        asked += 1
        assert asked < 30, doc
        doc = stager.client.get(f"{path}?since={doc['changes']}&wait=8")
    for _ in range(5):
        start = time.monotonic()
        again = stager.client.get(f"{path}?since={doc['changes']}&wait=1.5")
        if time.monotonic() - start >= 1.4:
            assert again["requests"] == doc["requests"] and again["staging"] == doc["staging"]
            break
        assert again["changes"] > doc["changes"]  # woken early: by a change
        doc = again
    else:
        pytest.fail(f"every request with nothing new to wait for answered at once: {doc}")
    # A count from an earlier answer, with news since, gets its answer at once.
    start = time.monotonic()
    stager.client.get(f"{path}?since=0&wait=8")
    assert time.monotonic() - start < 4


def test_warmup_to_a_node_slurm_does_not_know_is_refused_by_name(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(2, size=64))
    refused = stager.cli("alice", "warmup", src, "--nodes", "n1,n9,gpu-typo", "--json", check=False)
    assert refused.returncode == 1
    assert "Slurm has no node n9, gpu-typo" in refused.stderr
    assert "its nodes: n1, n2, n3" in refused.stderr
    # Nothing was recorded: no warmup for n1 either (the test runs as root: sees every job).
    jobs = stager.client.get("/api/v1/jobs?all=true")
    assert jobs and not [j for j in jobs if src in json.dumps(j)]


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


def _stats(stager: Stager, node: str) -> dict[str, int]:
    stats: dict[str, int] = json.loads(stager.cli("alice", "cache", "ls", node, "--json").stdout)[
        "stats"
    ]
    return stats


def test_a_node_copies_what_another_nodes_cache_holds_and_checks_every_object(
    stager: Stager,
) -> None:
    src, sums = make_dataset(stager.dev, small_files(30, size=1024))
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--json")
    on_n1 = _cached(stager, "n1", src)
    assert set(on_n1) == set(sums)
    # One object in n1's cache goes bad behind its back (same size, other bytes): n2 must
    # refuse that copy and fetch the object from the store instead.
    bad = sorted(on_n1)[3]
    bad_path = object_path(_cache_of(stager, "n1") / "objects", on_n1[bad])
    bad_path.write_bytes(bytes(1024))
    before = _stats(stager, "n2")

    doc = json.loads(stager.cli("alice", "warmup", src, "--nodes", "n2", "--json").stdout)

    after = _stats(stager, "n2")
    assert after["peer_objects"] - before["peer_objects"] == 29
    assert after["peer_refused"] - before["peer_refused"] == 1
    assert after["fetched_objects"] - before["fetched_objects"] == 1  # the bad one, from S3
    on_n2 = _cached(stager, "n2", src)
    assert set(on_n2) == set(sums)
    objects = _cache_of(stager, "n2") / "objects"
    got = {
        rel: hashlib.sha256(object_path(objects, cid).read_bytes()).hexdigest()
        for rel, cid in on_n2.items()
    }
    assert got == sums
    st = doc["requests"][0]["nodes"]["n2"]
    assert (st["peer_files"], st["fetched_files"]) == (29, 1), st
    events = json.dumps(doc["events"])
    assert "copied 29 objects" in events and "from n1's cache" in events
    assert "1 failed verification" in events


def test_a_single_object_input_is_copied_from_a_peer_too(stager: Stager) -> None:
    """An ``s3://bucket/key`` input (no trailing slash) goes from peer to peer like a prefix
    (issue 16: the daemon and the agent tested for a kind "s3-key" the parser never makes,
    so a single object always came from the store)."""
    prefix, sums = make_dataset(stager.dev, small_files(1, size=1024))
    (rel,) = sums
    src = prefix + rel
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--json")
    assert set(_cached(stager, "n1", prefix)) == {rel}
    before = _stats(stager, "n2")

    doc = json.loads(stager.cli("alice", "warmup", src, "--nodes", "n2", "--json").stdout)

    after = _stats(stager, "n2")
    assert after["peer_objects"] - before["peer_objects"] == 1
    assert after["fetched_objects"] - before["fetched_objects"] == 0
    st = doc["requests"][0]["nodes"]["n2"]
    assert (st["peer_files"], st["fetched_files"]) == (1, 0), st
    assert "copied 1 objects" in json.dumps(doc["events"])
