"""What `hpcstage env` tells a container to bind (HPCSTAGE_MOUNTS, docs/containers.md)."""

from __future__ import annotations

from pathlib import Path

from hpcstage.cli.user_cmds import container_mounts


def test_the_job_directory_alone_until_the_node_has_packed_trees(tmp_path: Path) -> None:
    view = tmp_path / "cache" / "jobs" / "42"
    view.mkdir(parents=True)
    assert container_mounts(view) == [str(view)]
    (tmp_path / "cache" / "packed").mkdir()
    # A packed input is a symlink into <cache>/packed: without it the link dangles inside.
    assert container_mounts(view) == [str(view), str(tmp_path / "cache" / "packed")]
