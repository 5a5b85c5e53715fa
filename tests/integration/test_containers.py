"""A job reads its staged inputs inside a rootless Podman container, binding what
``HPCSTAGE_MOUNTS`` names (docs/containers.md): unpacked inputs (hardlinks in the job
directory) and a packed one (a symlink into the node's shared tree) byte for byte.

The image is busybox, imported from a tar (no registry is reachable from the test machine).
Podman runs with runc and cgroupfs and no network: what works on this VM's hybrid cgroups.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin

from .staging import Stager, make_dataset, parse_sums, running_stager, small_files

pytestmark = pytest.mark.integration

IMAGE = "localhost/hpcstage-busybox"
PODMAN = "podman --runtime runc --cgroup-manager=cgroupfs"

JOB = """#!/bin/bash
#HPCSTAGE --stage-in={src}:data
#HPCSTAGE --stage-in={packed}:lib
eval "$(hpcstage env || echo exit 1)"
export XDG_RUNTIME_DIR="{runtime}" HOME="{home}"  # where the test imported the image
mounts=()
IFS=, read -ra paths <<< "$HPCSTAGE_MOUNTS"
for p in "${{paths[@]}}"; do mounts+=(-v "$p:$p:ro"); done
{podman} run --rm --pull=never --network=none "${{mounts[@]}}" {image} \\
    sh -c "cd $HPCSTAGE_DIR && find -L . -type f | sort | xargs sha256sum"
"""


def _why_not() -> str:
    for tool in ("podman", "runc", "newuidmap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap --tests installs it)"
    if not Path("/bin/busybox").exists():
        return "busybox-static is not installed (the container's image is made from it)"
    if "alice:" not in Path("/etc/subuid").read_text(errors="replace"):
        return "alice has no subordinate uid range (/etc/subuid): rootless Podman cannot run"
    return ""


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    why = _why_not()
    if why:
        pytest.skip(why)
    yield from running_stager(cluster, "containers")


def _as_alice(dev: DevCluster, runtime: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(dev.workdir("alice"))}
    return dev.run_as("alice", ["bash", "-c", command], env=env, check=False)


def _image(dev: DevCluster, runtime: Path) -> None:
    """busybox as an image of alice's, imported from a tar of /bin/busybox and its links."""
    tar = runtime / "busybox.tar"
    with tarfile.open(tar, "w") as out:
        out.add("/bin/busybox", "bin/busybox")
        for name in ("sh", "true", "find", "sort", "xargs", "sha256sum", "cat"):
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            out.addfile(link)
    tar.chmod(0o644)
    done = _as_alice(dev, runtime, f"{PODMAN} import {tar} {IMAGE}")
    if done.returncode != 0:
        pytest.skip(f"rootless Podman cannot import an image here: {done.stderr.strip()[-300:]}")
    # Whether a container runs at all here (user namespaces, cgroups, a chroot): else the
    # test could only say that this machine cannot run rootless containers.
    tried = _as_alice(dev, runtime, f"{PODMAN} run --rm --pull=never --network=none {IMAGE} true")
    if tried.returncode != 0:
        pytest.skip(f"rootless Podman cannot run a container here: {tried.stderr.strip()[-300:]}")


def _pack(dev: DevCluster, src: str) -> str:
    dest = f"s3://datasets/ctr-{uuid.uuid4().hex[:6]}.hpack/"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": dev.info.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": dev.info.s3_secret_key,
    }
    argv = [hpcstage_bin(), "pack", src, dest, "--endpoint-url", dev.info.s3_endpoint]
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
    return dest


def test_a_job_reads_its_inputs_inside_a_rootless_podman_container(stager: Stager) -> None:
    dev = stager.dev
    runtime = dev.workdir("alice") / f"xdg-{uuid.uuid4().hex[:6]}"
    runtime.mkdir(mode=0o700)
    alice = dev.workdir("alice").stat()
    os.chown(runtime, alice.st_uid, alice.st_gid)
    _image(dev, runtime)
    files = small_files(6, prefix="set/")
    src, sums = make_dataset(dev, files)
    packed = _pack(dev, src)
    home = dev.workdir("alice")
    script = JOB.format(
        src=src, packed=packed, runtime=runtime, home=home, podman=PODMAN, image=IMAGE
    )
    job = stager.submit("alice", script)
    state = dev.wait_job(job, timeout=180)
    out = stager.output("alice", job)
    assert state == "COMPLETED", out
    seen = parse_sums(out)
    expected = {f"data/{rel}": digest for rel, digest in sums.items()}
    expected |= {f"lib/{rel}": digest for rel, digest in sums.items()}
    assert seen == expected, out
    assert all(len(d) == 64 for d in seen.values())
    assert hashlib.sha256(files["set/f00000.dat"]).hexdigest() == seen["data/set/f00000.dat"]
