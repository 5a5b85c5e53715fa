"""Integration fixtures: one real dev cluster (Slurm, munge, S3, sshd) per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcstage.devcluster.cluster import DevCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    """Start a private dev cluster under a fresh /tmp directory; stop it after the session."""
    if os.geteuid() != 0:
        pytest.fail("integration tests start Slurm and sshd and must run as root")
    # World-traversable (not pytest's 0700 tmp dir): job users must reach slurm.conf and munge.
    base = Path(tempfile.mkdtemp(prefix="hpcstage-test-", dir="/tmp"))
    dev = DevCluster(base, name="hpctest")
    keep = os.environ.get("HPCSTAGE_TEST_KEEP") == "1"  # debugging: leave it all up
    try:
        dev.up()
        yield dev
    finally:
        if keep:
            print(f"\nHPCSTAGE_TEST_KEEP=1: cluster left running at {base}")
        else:
            dev.down()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL URL that may create databases: the machine's, or a private server."""
    from hpcstage.devcluster import pg

    base = Path(tempfile.mkdtemp(prefix="hpcstage-pg-", dir="/tmp"))
    base.chmod(0o755)
    url, stop = pg.find_or_start(base)
    try:
        yield url
    finally:
        stop()
        shutil.rmtree(base, ignore_errors=True)
