"""Man pages from the CLI's help (hpcstage/cli/manpages.py): one per visible command, each
rendered by man(1) without a warning, naming every option that ``--help`` names."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from hpcstage.cli import cli
from hpcstage.cli.manpages import escape, main, pages, paragraphs


def _visible_commands() -> list[str]:
    ctx = click.Context(cli, info_name="hpcstage")
    return [
        name
        for name in cli.list_commands(ctx)
        if not (command := cli.get_command(ctx, name)) or not command.hidden
    ]


def test_one_page_per_visible_command() -> None:
    names = set(pages("9.9"))
    assert names == {"hpcstage.1", *(f"hpcstage-{name}.1" for name in _visible_commands())}
    assert "hpcstage-agent.1" not in names and "hpcstage-pack-step.1" not in names
    assert "hpcstage-status.1" in names and "hpcstage-trash.1" in names


def test_escape_takes_text_literally() -> None:
    assert escape("a-b \\n") == "a\\-b \\en"
    assert escape(".TH x\n'x\nok.") == "\\&.TH x\n\\&'x\nok."


def test_paragraphs_keep_preformatted_blocks() -> None:
    text = "Summary line.\n\nWrapped\nprose.\n\n\b\nExample:\n  run  it\n\fhidden"
    assert list(paragraphs(text)) == [
        (False, "Summary line."),
        (False, "Wrapped prose."),
        (True, "Example:\n  run  it"),
    ]


def test_main_writes_the_pages(tmp_path: Path) -> None:
    assert main([str(tmp_path / "man1")]) == 0
    assert sorted(p.name for p in (tmp_path / "man1").iterdir()) == sorted(pages("x"))
    assert main([]) == 2


def _man(page: Path) -> tuple[str, str]:
    env = {**os.environ, "MANWIDTH": "2000", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    proc = subprocess.run(
        ["man", "--warnings", "-E", "ascii", "-l", str(page)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    return proc.stdout, proc.stderr


def _help_options(path: list[str]) -> list[str]:
    """Every option string ``hpcstage PATH --help`` shows, e.g. "--log-format"."""
    ctx = click.Context(cli, info_name="hpcstage", **cli.context_settings)
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        found = command.get_command(ctx, name)
        assert found is not None
        command = found
        ctx = click.Context(command, info_name=name, parent=ctx)
    return [
        opt
        for param in command.get_params(ctx)
        if isinstance(param, click.Option) and not param.hidden
        for opt in param.opts
    ]


@pytest.mark.skipif(shutil.which("man") is None, reason="man(1) is not installed")
def test_man_renders_every_page(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    for name in _visible_commands():
        out, warnings = _man(tmp_path / f"hpcstage-{name}.1")
        assert warnings == "", f"{name}: {warnings}"
        assert out.startswith(f"HPCSTAGE-{name.upper()}(1)"), out[:200]
        for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SEE ALSO"):
            assert f"\n{heading}\n" in out, (name, heading)
        assert f"hpcstage {name} [OPTIONS]" in out
        assert all(opt in out for opt in _help_options([name])), name
        assert not any(esc in out for esc in ("\\-", "\\e", "\\&")), name  # all rendered
    daemon, _ = _man(tmp_path / "hpcstage-daemon.1")
    assert "--log-format [auto|text|json|journal]" in daemon
    # A \b block of the help keeps its lines and their indentation.
    example = "\n       Example:\n         hpcstage daemon --config /etc/hpcstage/site.toml\n"
    assert example in daemon
    trash, _ = _man(tmp_path / "hpcstage-trash.1")
    assert "hpcstage trash restore [OPTIONS] URL" in trash
    assert all(opt in trash for opt in _help_options(["trash", "ls"]))
    main_page, warnings = _man(tmp_path / "hpcstage.1")
    assert warnings == ""
    assert all(f"hpcstage-{name}(1)" in main_page for name in _visible_commands())
