"""`hpcstage warmup` and `hpcstage cache` on the real dev cluster, with eviction by policy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.devcluster.cluster import DevCluster
from hpcstage.devcluster.site import write_site_config

from .staging import Stager, make_dataset, small_files

pytestmark = pytest.mark.integration

# A tiny cache so that eviction has something to do: 1 MiB, evict from 90 % down to 50 %.
CACHE = """
[cache]
max_bytes = "1MiB"
high_watermark = 0.9
low_watermark = 0.5
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    config = write_site_config(cluster, name="warmup.toml", extra="")
    text = config.read_text().replace('[cache]\nmax_bytes = "20GiB"\n', CACHE.lstrip())
    config.write_text(text)
    (Path(cluster.info.base) / "daemon" / "state.db").unlink(missing_ok=True)
    st = Stager(cluster, config, "daemon-warmup.log")
    st.start()
    try:
        yield st
    finally:
        st.stop()


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
