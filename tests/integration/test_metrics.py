"""/metrics after a known staging on the dev cluster: a daemon of its own (so its counters hold
this module's jobs only) stages a dataset of known sizes in for one job and its outputs of
known sizes out; /metrics is then scraped over HTTP and parsed whole by prometheus_client's
parser, and checked by `promtool check metrics` (its lint included: names, units, _total,
help texts), which scripts/bootstrap --tests installs."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devcluster.cluster import DevCluster
from hpcstage import __version__, auth

from .staging import (
    Stager,
    make_dataset,
    parse_sums,
    running_stager,
    wait_until,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

OUTPUTS = {"a.bin": 12345, "b.bin": 678}  # name -> size, of what the job writes out

JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}
#HPCSTAGE --stage-out=out:{dest}
set -e
eval "$(hpcstage env)"
(cd "$HPCSTAGE_DIR/{name}" && find . -type f | sort | xargs sha256sum)
mkdir -p "$HPCSTAGE_DIR/out"
""" + "".join(
    f'head -c {size} /dev/urandom > "$HPCSTAGE_DIR/out/{n}"\n' for n, size in OUTPUTS.items()
)


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "metrics")


def scrape(stager: Stager) -> str:
    """The exposition text, read as an admin (root's MUNGE credential) over HTTP."""
    socket = f"{stager.dev.info.base}/munge-run/munge.socket"
    req = urllib.request.Request(  # noqa: S310 - loopback test URL
        f"{stager.client.base_url}/metrics", headers={"Authorization": auth.header(socket)}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def samples(text: str) -> Samples:
    """Every sample by name and labels (the parser refuses text that is not exposition)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples over the labels not given (e.g. every node)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= set(ls))


def test_a_known_staging_is_counted_exactly(stager: Stager) -> None:
    # Sizes that tell one object from another, and one large enough for the streamed download.
    files = {f"f{i}.dat": bytes([i]) * (1000 + 37 * i) for i in range(6)}
    files["big.bin"] = b"\x07" * (3 << 20)
    src, sums = make_dataset(stager.dev, files)
    size = sum(len(b) for b in files.values())
    name = src.rstrip("/").rsplit("/", 1)[1]
    out = f"s3://results/metrics-{uuid.uuid4().hex[:8]}/%j/"
    job = stager.submit("alice", JOB.format(src=src, name=name, dest=out), "--account=chem")
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    assert parse_sums(stager.output("alice", job)) == sums
    doc = stager.wait_doc(job, "staged out", lambda d: d["stage_out"] in ("done", "failed"), 120)
    assert doc["stage_out"] == "done", doc
    node = doc["nodes"][0]

    found = samples(scrape(stager))
    assert found["hpcstage_build_info", (("version", __version__),)] == 1
    assert total(found, "hpcstage_store_fetched_bytes_total") == size
    assert found["hpcstage_store_fetched_bytes_total", (("node", node),)] == size
    assert total(found, "hpcstage_store_fetched_objects_total") == len(files)
    assert total(found, "hpcstage_cache_misses_total") == len(files)
    assert total(found, "hpcstage_cache_hits_total") == 0
    assert total(found, "hpcstage_peer_copied_objects_total") == 0
    ready = {"direction": "in", "outcome": "ready"}
    assert total(found, "hpcstage_staging_attempts_total", **ready) == 1
    assert total(found, "hpcstage_staging_attempts_total", outcome="failed") == 0
    assert found["hpcstage_store_uploaded_bytes_total", (("node", node),)] == sum(OUTPUTS.values())
    assert found["hpcstage_store_uploaded_objects_total", (("node", node),)] == len(OUTPUTS)
    out_ready = {"direction": "out", "outcome": "ready"}
    assert total(found, "hpcstage_staging_attempts_total", **out_ready) == 1
    assert found["hpcstage_job_time_to_ready_seconds_count", (("kind", "job"),)] == 1
    # `hpcstage env` in the job asked once it ran: one wait, however many times it asked.
    assert found["hpcstage_job_data_wait_seconds_count", ()] == 1
    assert total(found, "hpcstage_stagings", direction="in") >= 1
    assert found["hpcstage_last_tick_timestamp_seconds", ()] > 0

    # The node's cache gauges come with the daemon's next eviction pass (every 30 s).
    def cache_counted() -> bool:
        now = samples(scrape(stager))
        held = now.get(("hpcstage_node_cache_bytes", (("node", node),)), 0)
        objects = now.get(("hpcstage_node_cache_objects", (("node", node),)), 0)
        return held >= size and objects >= len(files)

    wait_until(f"{node}'s cache in the gauges", cache_counted, 90, stager.log)
    # The same pass brings the agent's retries and SDK fallbacks (tests/integration/
    # test_hostile_store.py makes some; a healthy store may still need one, rarely).
    found = samples(scrape(stager))
    assert ("hpcstage_store_retries_total", (("node", node),)) in found
    assert ("hpcstage_store_sdk_fallbacks_total", (("node", node),)) in found


def test_promtool_accepts_the_exposition(stager: Stager) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed: `scripts/bootstrap --tests` takes it out of Debian's"
            " prometheus package (the binary only, no server); prometheus_client's parser"
            " checks the text in the test above"
        )
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(stager), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
