"""Integration fixtures: one real dev cluster (Slurm, munge, S3, sshd) per test session."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import DevCluster

from .staging import drop_stale_databases, private_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    """Start a private dev cluster under a fresh /tmp directory; stop it after the session."""
    yield from private_cluster("test", "hpctest")


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL URL that may create databases: the machine's, or a private server."""
    from devcluster import pg

    base = Path(tempfile.mkdtemp(prefix="hpcstage-pg-", dir="/tmp"))
    base.chmod(0o755)
    url, stop = pg.find_or_start(base)
    try:
        drop_stale_databases(url)  # left by runs that were killed
        yield url
    finally:
        stop()
        shutil.rmtree(base, ignore_errors=True)
