"""Per-job and per-user limits on the real dev cluster (issue 15, item 8): a prefix of too
many objects, a stage-out of too many files and warmups requested too fast are refused, each
naming the limit, and nothing is fetched, uploaded or queued beyond it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files
from .test_stageout import s3_objects, wait_stage_out, writer_job

pytestmark = pytest.mark.integration

LIMITS = """
[limits]
stage_in_objects = 20
stage_out_files = 5
warmups_in_flight = 50
warmups_per_minute = 3
"""


MAX_OBJECTS = 40  # cache.max_objects: the watermarks (0.9, 0.8) apply to the count too


def _count_objects(text: str) -> str:
    assert '[cache]\nmax_bytes = "20GiB"\n' in text
    return text.replace(
        '[cache]\nmax_bytes = "20GiB"\n',
        f'[cache]\nmax_bytes = "20GiB"\nmax_objects = {MAX_OBJECTS}\n',
    )


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "limits", extra=LIMITS, edit=_count_objects)


def test_a_prefix_of_more_objects_than_the_limit_fails_the_job_naming_it(stager: Stager) -> None:
    # Tiny objects: no byte quota sees them. (Not empty ones: rclone's server now and then lists
    # a just-written empty file without an ETag, which hpcstage rightly refuses to stage.)
    src, _ = make_dataset(stager.dev, small_files(30, size=1))
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}:data\neval "$(hpcstage env)"\necho RAN\n'
    job = stager.submit("alice", script)
    assert stager.dev.wait_job(job, timeout=120) == "FAILED"
    out = stager.output("alice", job)
    assert "RAN" not in out
    assert "more than 20 objects" in out and "limits.stage_in_objects is 20" in out, out


def test_a_stage_out_of_more_files_than_the_limit_fails_before_any_upload(stager: Stager) -> None:
    prefix = f"many-{uuid.uuid4().hex[:8]}/"
    body = "for i in $(seq 8); do echo $i > f$i; done"
    job = stager.submit("alice", writer_job(f"s3://results/{prefix}", body))
    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED"
    doc = wait_stage_out(stager, job)
    assert doc["stage_out"] == "failed", doc
    text = json.dumps(doc)
    assert "more than 5 files" in text and "limits.stage_out_files = 5" in text, text
    assert s3_objects(stager.dev, prefix) == {}


def test_zero_byte_objects_over_the_caches_object_mark_are_evicted(stager: Stager) -> None:
    for _ in range(2):  # 38 one-byte objects (each within stage_in_objects): no byte mark
        src, _ = make_dataset(stager.dev, small_files(19, size=1))
        stager.cli("alice", "warmup", src, "--nodes", "n3", "--json")
    stager.client.post("/api/v1/nodes/n3/evict")  # (the daemon's own pass may come first)
    after = json.loads(stager.cli("alice", "cache", "ls", "n3", "--json").stdout)["usage"]
    assert after["objects"] - after["leased_objects"] <= 0.8 * MAX_OBJECTS, after


def test_warmups_over_the_rate_are_refused_with_the_limit(stager: Stager) -> None:
    src, _ = make_dataset(stager.dev, small_files(2))
    for _ in range(3):
        stager.cli("bob", "warmup", src, "--nodes", "n1", "--no-wait")
    refused = stager.cli("bob", "warmup", src, "--nodes", "n1", "--no-wait", check=False)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "limits.warmups_per_minute is 3" in said, said
    # Another user is not held back by bob's requests.
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--no-wait")
