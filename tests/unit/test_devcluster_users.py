"""The dev cluster's reach check: which directories keep its users from the checkout."""

from __future__ import annotations

from pathlib import Path

from devcluster.users import unreachable_dirs


def below(base: Path, found: list[Path]) -> list[Path]:
    """``found`` within ``base`` (pytest's own base directory is 0700 too)."""
    return [d for d in found if d.is_relative_to(base)]


def test_directories_others_cannot_enter_are_found_once(tmp_path: Path) -> None:
    closed = tmp_path / "root"  # like /root on Debian: 0700
    checkout = closed / "src" / "hpcstage"
    venv = checkout / ".venv"
    venv.mkdir(parents=True)
    for d in (tmp_path, closed.parent, checkout.parent, checkout, venv):
        d.chmod(0o755)
    closed.chmod(0o700)
    assert below(tmp_path, unreachable_dirs([venv, checkout])) == [closed]
    closed.chmod(0o711)  # search permission is all it takes
    assert below(tmp_path, unreachable_dirs([venv, checkout])) == []
    checkout.chmod(0o750)
    assert below(tmp_path, unreachable_dirs([venv, checkout])) == [checkout]


def test_missing_paths_are_skipped(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    assert below(tmp_path, unreachable_dirs([tmp_path / "not" / "there"])) == []
