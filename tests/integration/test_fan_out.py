"""Fan-out (issue 18, item 3) on the real dev cluster: a three-node job whose inputs include a
1 GiB object gets that object's bytes from the store once; the two other nodes copy it node
to node from the first, the daemon out of the data path, and every node reads exact bytes.

The store is the cluster's S3 server behind ``tests/counting_proxy.py``, which counts the
bytes of the answers to GETs of each key: ranged GETs of parts of one copy add up to one copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from counting_proxy import CountingProxy  # tests/: on sys.path, above the integration package

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, parse_sums, running_stager, small_files

pytestmark = pytest.mark.integration

GIB = 1 << 30
NODES = ("n1", "n2", "n3")

FAN_OUT_JOB = """#!/bin/bash
#SBATCH --nodes=3
#SBATCH --job-name=fanout
#HPCSTAGE --stage-in={big}:inputs/
#HPCSTAGE --stage-in={small}:small
eval "$(hpcstage env)"
srun --nodes=3 --ntasks=3 bash -c '
    eval "$(hpcstage env)" || exit 1
    cd "$HPCSTAGE_DIR" || exit 1
    find -L . -type f | sort | xargs sha256sum | sed "s|^|$SLURMD_NODENAME |"
'
"""


@dataclass
class Setup:
    stager: Stager
    proxy: CountingProxy


@pytest.fixture(scope="module")
def setup(cluster: DevCluster) -> Iterator[Setup]:
    s3 = urlsplit(cluster.info.s3_endpoint)
    assert s3.hostname is not None and s3.port is not None
    proxy = CountingProxy(s3.hostname, s3.port)
    endpoint = proxy.start()

    def through_proxy(text: str) -> str:
        assert text.count(cluster.info.s3_endpoint) == 1
        return text.replace(cluster.info.s3_endpoint, endpoint)

    try:
        for stager in running_stager(cluster, "fanout", edit=through_proxy):
            yield Setup(stager, proxy)
    finally:
        proxy.stop()


def _put_big(dev: DevCluster, key: str) -> str:
    """A 1 GiB object of distinct MiBs (a bug that moves or repeats a block shows), uploaded
    in one PUT so that its ETag is the MD5 of its bytes; returns its SHA-256."""
    block = os.urandom(1 << 20)
    body = bytearray(GIB)
    view = memoryview(body)
    for i in range(GIB >> 20):
        view[i << 20 : (i + 1) << 20] = block
        view[i << 20 : (i << 20) + 8] = i.to_bytes(8, "big")
    digest = hashlib.sha256(view).hexdigest()

    async def put() -> None:
        async with dev.s3_client() as s3:
            await s3.put_object(Bucket="datasets", Key=key, Body=bytes(body))

    asyncio.run(put())
    return digest


def _node_sums(output: str) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        node, _, rest = line.partition(" ")
        if node in NODES:
            found.setdefault(node, {}).update(parse_sums(rest))
    return found


def test_a_1_gib_input_of_a_three_node_job_leaves_the_store_once(setup: Setup) -> None:
    stager, proxy = setup.stager, setup.proxy
    key = f"fan-{uuid.uuid4().hex[:8]}/big.bin"
    big_sum = _put_big(stager.dev, key)
    files = small_files(20, size=4096)
    small, small_sums = make_dataset(stager.dev, files)

    job = stager.submit("alice", FAN_OUT_JOB.format(big=f"s3://datasets/{key}", small=small))
    state = stager.dev.wait_job(job, timeout=1800)
    out = stager.output("alice", job)
    assert state == "COMPLETED", out

    # Every node read exactly the bytes in the store.
    expected = {"inputs/big.bin": big_sum, **{f"small/{r}": s for r, s in small_sums.items()}}
    assert _node_sums(out) == dict.fromkeys(NODES, expected), out

    # The store served the big object's bytes once (in ranged parts, headers aside), each
    # small object once.
    served = proxy.served("datasets", key)
    assert GIB <= served < GIB + (1 << 20), (served, proxy.get_count("datasets", key))
    prefix = small.removeprefix("s3://datasets/")
    assert [proxy.get_count("datasets", prefix + rel) for rel in files] == [1] * len(files)

    # One node fetched it, the two others copied it from a peer's cache.
    doc = stager.doc(job)
    big_row = next(r for r in doc["requests"] if r["src"].endswith(key))
    per_node = {n: big_row["nodes"][n] for n in NODES}
    fetched = sorted(n for n, st in per_node.items() if st["fetched_files"] == 1)
    copied = sorted(n for n, st in per_node.items() if st["peer_files"] == 1)
    assert len(fetched) == 1 and sorted(fetched + copied) == list(NODES), per_node
    events = json.dumps(doc["events"])
    assert events.count(f"of s3://datasets/{key} from {fetched[0]}'s cache") == 2, events


def _cached_copies(dev: DevCluster, node: str, size: int) -> list[Path]:
    objects = Path(dev.info.base) / "nodes" / node / "cache" / "objects"
    return [p for p in objects.glob("*/*") if p.is_file() and p.stat().st_size == size]


def test_bytes_that_went_bad_on_the_peer_are_refused_and_fetched_from_the_store(
    setup: Setup,
) -> None:
    stager, proxy, dev = setup.stager, setup.proxy, setup.stager.dev
    key = f"fan-{uuid.uuid4().hex[:8]}/mid.bin"
    body = os.urandom(8 << 20) + b"an odd size"  # above 1 MiB: node to node

    async def put() -> None:
        async with dev.s3_client() as s3:
            await s3.put_object(Bucket="datasets", Key=key, Body=body)

    asyncio.run(put())
    src = f"s3://datasets/{key}"
    stager.cli("alice", "warmup", src, "--nodes", "n1", "--json")
    (held,) = [p for p in _cached_copies(dev, "n1", len(body)) if p.read_bytes() == body]
    held.chmod(0o644)
    with open(held, "r+b") as file:  # the holder's disk returns one wrong byte
        file.seek(5 << 20)
        file.write(bytes([body[5 << 20] ^ 0xFF]))

    doc = json.loads(stager.cli("alice", "warmup", src, "--nodes", "n2", "--json").stdout)

    events = json.dumps(doc["events"])
    assert "1 failed verification or could not be read (fetched from the store)" in events
    # n2 holds the store's bytes, which the store served twice: to n1, then to n2.
    assert [p.read_bytes() == body for p in _cached_copies(dev, "n2", len(body))] == [True]
    served = proxy.served("datasets", key)
    assert 2 * len(body) <= served < 2 * len(body) + (1 << 20), served
