"""The SPANK plugin on its own real dev cluster: `#SBATCH --stage-in`, HPCSTAGE_DIR at line 1.

The cluster here is separate from the session's (``DevCluster(spank=True)`` builds
spank_plugin/ and loads it through plugstack.conf); the daemon runs as in test_stagein.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, parse_sums, private_cluster, running_stager, small_files

pytestmark = pytest.mark.integration

PLUGIN_SRC = Path(__file__).resolve().parents[2] / "spank_plugin"
# What Slurm looks up in a SPANK plugin; nothing else may be exported.
ALLOWED_EXPORTS = {"plugin_name", "plugin_type", "plugin_version"}


@pytest.fixture(scope="module")
def spank_dev() -> Iterator[DevCluster]:
    """A dev cluster of its own with the plugin loaded; stopped and removed at the end."""
    yield from private_cluster("spank", "hpcspank", spank=True)


@pytest.fixture(scope="module")
def stager(spank_dev: DevCluster) -> Iterator[Stager]:
    yield from running_stager(spank_dev, "spank", concurrency=8)


def test_plugin_builds_warning_free_and_exports_only_what_slurm_needs(tmp_path: Path) -> None:
    # -Wall -Wextra -Werror are in the Makefile: a warning fails the build.
    build = subprocess.run(
        ["make", "-C", str(PLUGIN_SRC), f"BUILD={tmp_path}", "all", "test"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "0 failed" in build.stdout, build.stdout  # the C unit tests
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", str(tmp_path / "hpcstage_spank.so")],
        capture_output=True,
        text=True,
        check=True,
    )
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    spank = {name for name in exported if name.startswith("slurm_spank_")}
    assert exported - spank == ALLOWED_EXPORTS, exported
    assert {"slurm_spank_init", "slurm_spank_user_init", "slurm_spank_task_init"} <= spank
    flags = subprocess.run(
        ["readelf", "-d", str(tmp_path / "hpcstage_spank.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "BIND_NOW" in flags  # -z now (full RELRO)


def test_sbatch_stage_in_sets_hpcstage_dir_before_the_first_line(stager: Stager) -> None:
    files = {**small_files(20, prefix="lig/"), "receptor.pdb": os.urandom(70_000)}
    src, sums = make_dataset(stager.dev, files)
    script = f"""#!/bin/bash
#SBATCH --job-name=spank
#SBATCH --stage-in={src}lig/
echo "first=${{HPCSTAGE_DIR:-unset}}"
cd "$HPCSTAGE_DIR" && find . -type f | sort | xargs sha256sum
"""
    # One directive in an #SBATCH line, one on sbatch's command line: both reach the daemon.
    job = stager.submit("alice", script, f"--stage-in={src}receptor.pdb:inputs/r.pdb")
    assert stager.dev.wait_job(job, timeout=90) == "COMPLETED", stager.output("alice", job)
    out = stager.output("alice", job)
    first = out.splitlines()[0]
    node = stager.doc(job)["nodes"][0]
    assert first == f"first={stager.dev.info.node_cache(node)}/jobs/{job}", out
    want = {f"lig/{k.removeprefix('lig/')}": v for k, v in sums.items() if k.startswith("lig/")}
    want["inputs/r.pdb"] = sums["receptor.pdb"]
    assert parse_sums(out) == want, out
    doc = stager.doc(job)
    assert doc["directive_source"] == "admin_comment", doc
    texts = sorted(r["text"] for r in doc["requests"] if r["direction"] == "in")
    # Each directive once: job_submit.lua does not read #SBATCH lines the plugin passed on.
    assert texts == sorted(
        [f"--stage-in={src}lig/", f"--stage-in={src}receptor.pdb:inputs/r.pdb"]
    ), texts


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--stage-in=s3://datasets/../etc/passwd", "'..' component"),
        ("--stage-in=relative/ligands", "SRC must be s3://"),
        ("--stage-out=/abs/out:s3://results/x/", "must be relative"),
        ("--stage-in=s3://datasets/p/::include=data[12.nc", "a '[' without its ']'"),
    ],
)
def test_malformed_value_makes_sbatch_fail_with_the_plugins_message(
    stager: Stager, option: str, message: str
) -> None:
    dev = stager.dev
    path = dev.workdir("bob") / f"bad-{uuid.uuid4().hex[:6]}.sh"
    path.write_text(f"#!/bin/bash\n#SBATCH {option}\necho RAN\n")
    os.chmod(path, 0o644)
    done = dev.run_as("bob", ["sbatch", "--parsable", str(path)], check=False)
    assert done.returncode != 0, done.stdout
    assert f"hpcstage: invalid {option}" in done.stderr and message in done.stderr, done.stderr
    done = dev.run_as("bob", ["sbatch", option, "--wrap", "echo RAN"], check=False)
    assert done.returncode != 0 and f"hpcstage: invalid {option}" in done.stderr, done.stderr


def test_jobs_without_the_options_behave_as_before(stager: Stager) -> None:
    plain = stager.submit(
        "bob", '#!/bin/bash\necho "dir=${HPCSTAGE_DIR:-unset}"\nenv | grep -c SPANK || true\n'
    )
    src, sums = make_dataset(stager.dev, {"a.txt": b"classic path\n"})
    classic = stager.submit(
        "bob",
        f"#!/bin/bash\n#HPCSTAGE --stage-in={src}a.txt\n"
        'echo "dir=${HPCSTAGE_DIR:-unset}"\neval "$(hpcstage env)"\n'
        'cd "$HPCSTAGE_DIR" && sha256sum a.txt\n',
    )
    for job in (plain, classic):
        assert stager.dev.wait_job(job, timeout=90) == "COMPLETED", stager.output("bob", job)
    assert stager.output("bob", plain).split() == ["dir=unset", "0"]
    out = stager.output("bob", classic)
    assert out.splitlines()[0] == "dir=unset", out  # the plugin left it to `hpcstage env`
    assert parse_sums(out) == sums, out


def test_missing_object_fails_the_job_before_its_first_line(stager: Stager) -> None:
    src = f"s3://datasets/nothing-{uuid.uuid4().hex[:6]}/receptor.pdb"
    job = stager.submit("bob", f"#!/bin/bash\n#SBATCH --stage-in={src}\necho RAN\n")
    assert stager.dev.wait_job(job, timeout=90) == "FAILED"
    out = stager.output("bob", job)
    assert "RAN" not in out, out
    assert f"hpcstage: job {job} cannot start" in out, out
    assert src in out and "no such object" in out, out


def test_unknown_plugstack_argument_is_refused(stager: Stager) -> None:
    conf = Path(stager.dev.info.base) / "etc" / "plugstack.conf"
    line = conf.read_text()
    try:
        conf.write_text(line.rstrip("\n") + " colour=blue\n")
        done = stager.dev.run_as("bob", ["sbatch", "--wrap", "true"], check=False)
    finally:
        conf.write_text(line)
    assert done.returncode != 0, done.stdout
    assert 'hpcstage: unknown plugstack.conf argument "colour=blue"' in done.stderr, done.stderr
