"""Nasty object keys end to end (issue 15, "Must show"): uploaded to the dev cluster's real S3
server (rclone), staged by the daemon into a job's view, read back by the job itself.

tests/unit/test_fuzz_keys.py checks the key -> view-path mapping on generated keys; here a
fixed corpus of keys that S3 allows and that break naive code (URL, shell and path syntax,
quotes, Unicode forms and look-alikes, names of exactly 255 bytes, deep paths, keys that differ
only in case or normalisation form) must reach the job byte-exact: every file at its key's
path, with its bytes, and nothing else. A key hpcstage refuses (a control character) fails the
job, naming the key.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager

pytestmark = pytest.mark.integration

NFC = unicodedata.normalize("NFC", "Résumé")
NFD = unicodedata.normalize("NFD", "Résumé")
# Each a relative key under the dataset's prefix; each legal, and a file of its own.
CORPUS = [
    "plain.txt",
    "with space.txt",
    " leading space",
    "trailing space ",
    "per%cent%20and%2F%%.txt",  # '%' escapes that must not be decoded
    "plus+sign+.txt",  # '+' that must not become a space
    "hash#tag",
    "question?mark=1&b=2;c",
    "single'quote",
    'double"quote',
    "back\\slash\\",
    "star*and[brackets]{x}",
    "dollar$HOME`tick`!",
    "tilde~at@comma,colon:",
    "üñíçødé/日本語/файл.txt",
    "emoji😀/😀😀.bin",
    f"forms/{NFC}",  # the same word in NFC and NFD: two keys, two files
    f"forms/{NFD}",
    "case/Readme",  # three keys that differ only in case
    "case/README",
    "case/readme",
    "zero\u200bwidth",  # invisible, but no control character (Cf)
    "bidi\u202eevil.txt",
    "nbsp\u00a0name",
    "one\u2024dot\uff0eand\u2215slash",  # look-alikes of '.' and '/'
    "..dots..",
    "...",
    ".hidden",
    "a" * 255,  # NAME_MAX exactly
    "é" * 127 + "a",  # 255 bytes
    "/".join(["d"] * 60) + "/leaf",  # deep
    "long/" + "/".join(["x" * 200] * 4),  # a key of about 830 bytes
]
REFUSED = "bad/new\nline"  # S3 (and rclone) store it; no file in a view is named so

JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}:data
eval "$(hpcstage env)" || exit 1
cd "$HPCSTAGE_DIR/data" && python3 - <<'EOF'
import hashlib, os
for top, _, files in os.walk(b"."):
    for name in files:
        path = os.path.join(top, name)
        with open(path, "rb") as f:
            print("FILE", path[2:].hex(), hashlib.sha256(f.read()).hexdigest())
EOF
"""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "fuzz-keys", concurrency=8)


def body(key: str) -> bytes:
    return key.encode() + b"\n" + hashlib.sha256(key.encode()).digest() * 3


def staged(output: str) -> dict[bytes, str]:
    """The job's files: path bytes (as the directories named them) -> SHA-256."""
    found = {}
    for line in output.splitlines():
        if line.startswith("FILE "):
            _, path_hex, digest = line.split()
            found[bytes.fromhex(path_hex)] = digest
    return found


def test_nasty_keys_are_staged_byte_exact_or_refused_by_name(stager: Stager) -> None:
    assert len(set(CORPUS)) == len(CORPUS)
    src, sums = make_dataset(stager.dev, {key: body(key) for key in CORPUS})
    bad_src, _ = make_dataset(stager.dev, {"good.txt": b"good", REFUSED: b"bad"})
    job = stager.submit("alice", JOB.format(src=src), "--account=chem")
    refused = stager.submit("alice", JOB.format(src=bad_src), "--account=chem")

    assert stager.dev.wait_job(job, timeout=120) == "COMPLETED", stager.output("alice", job)
    expected = {key.encode(): sums[key] for key in CORPUS}
    assert staged(stager.output("alice", job)) == expected

    assert stager.dev.wait_job(refused, timeout=120) == "FAILED"
    out = stager.output("alice", refused)
    assert "FILE" not in out, out  # the job did not run with part of its inputs
    key = bad_src.removeprefix("s3://datasets/") + REFUSED
    named = f"object key {key!r} cannot be a file in the job's view"
    assert named in out and "control character '\\n'" in out, out
    status = stager.cli("alice", "status", str(refused)).stdout
    assert named in status, status
