"""``hpcstage pack``'s command line: mistakes are refused with a message that says what to do,
and the help shows examples."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from hpcstage.cli import cli
from hpcstage.errors import PackError


def _run(*args: str) -> BaseException | None:
    return CliRunner().invoke(cli, ["pack", *args]).exception


def test_dest_must_name_a_packed_dataset(tmp_path: Path) -> None:
    error = _run(str(tmp_path), "s3://bucket/lib/")
    assert isinstance(error, PackError)
    assert "name ends in .hpack" in str(error)


def test_a_missing_source_is_named(tmp_path: Path) -> None:
    error = _run(str(tmp_path / "nope"), str(tmp_path / "lib.hpack"))
    assert isinstance(error, PackError)
    assert "no such directory" in str(error)


def test_dest_inside_src_is_refused(tmp_path: Path) -> None:
    for src, dest in [
        (str(tmp_path), str(tmp_path / "sub" / "lib.hpack")),
        ("s3://bucket/data/", "s3://bucket/data/lib.hpack/"),
        ("s3://bucket", "s3://bucket/lib.hpack/"),
    ]:
        error = _run(src, dest)
        assert isinstance(error, PackError), (src, dest)
        assert "lies inside" in str(error)


def test_a_bad_segment_size_is_refused(tmp_path: Path) -> None:
    error = _run(str(tmp_path / "src"), str(tmp_path / "lib.hpack"), "--segment-size", "1K")
    assert isinstance(error, PackError)
    assert "at least" in str(error)


def test_a_directory_packs_onto_a_shared_filesystem(tmp_path: Path) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x").write_bytes(b"x" * 1000)
    (tmp_path / "src" / "b").write_bytes(b"")
    dest = tmp_path / "out" / "lib.hpack"
    dest.parent.mkdir()
    env = {"TMPDIR": str(tmp_path)}
    result = CliRunner(env=env).invoke(cli, ["pack", str(tmp_path / "src"), str(dest), "--json"])
    assert result.exit_code == 0, result.output
    assert '"event": "done"' in result.output.splitlines()[-1]
    assert (dest / "versions" / "00000001.json").exists()
    again = CliRunner(env=env).invoke(cli, ["pack", str(tmp_path / "src"), str(dest), "--update"])
    assert again.output.strip() == "version 1 is up to date: nothing changed, nothing written"


def test_help_shows_examples() -> None:
    result = CliRunner().invoke(cli, ["pack", "--help"])
    assert result.exit_code == 0
    assert "hpcstage pack --update" in result.output
    assert "--slurm" in result.output
