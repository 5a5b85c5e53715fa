"""Man pages written from the CLI's own help, so that ``man hpcstage-status`` and
``hpcstage status --help`` cannot disagree.

``python -m hpcstage.cli.manpages DIR`` writes ``hpcstage.1`` and one
``hpcstage-COMMAND.1`` per visible command into DIR (scripts/install-prefix: into
PREFIX/share/man/man1); a group's subcommands are sections of its page. Plain roff with the
man(7) macros, made from click's help records: no dependency beyond click.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from hpcstage.cli import cli

PROG = "hpcstage"
MANUAL = "hpcstage manual"


def escape(text: str) -> str:
    """``text`` as roff prose: backslashes and hyphens taken literally (``\\-`` is the ASCII
    hyphen that a reader can copy into a shell), and no line taken for a request."""
    lines = text.replace("\\", "\\e").replace("-", "\\-").split("\n")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def paragraphs(help_text: str) -> Iterator[tuple[bool, str]]:
    """The paragraphs of a click help text, each with whether it is preformatted (click's
    ``\\b`` line before it: keep its line breaks). Text after ``\\f`` is not help."""
    text = inspect.cleandoc(help_text.partition("\f")[0])
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if lines and lines[0].strip() == "\b":
            yield True, "\n".join(lines[1:])
        elif block.strip():
            yield False, " ".join(line.strip() for line in lines)


def _description(command: click.Command) -> list[str]:
    out: list[str] = []
    for preformatted, text in paragraphs(command.help or ""):
        out += [".PP", ".nf", escape(text), ".fi"] if preformatted else [".PP", escape(text)]
    return out


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue  # arguments are in the synopsis, as in --help
        record = param.get_help_record(ctx)
        if record is not None:
            out += [".TP", f".B {escape(record[0])}", escape(record[1] or "")]
    return out


def _synopsis(command: click.Command, ctx: click.Context) -> list[str]:
    pieces = " ".join(command.collect_usage_pieces(ctx))
    return [f".B {escape(ctx.command_path)}", escape(pieces)]


def _section(command: click.Command, ctx: click.Context) -> list[str]:
    """Synopsis, description and options of a group's subcommand, under its own heading."""
    return [
        f'.SS "{escape(ctx.command_path)}"',
        *_synopsis(command, ctx),
        *_description(command),
        ".PP",
        "Options:",
        ".RS",
        *_options(command, ctx),
        ".RE",
    ]


def _subcommands(group: click.Group, ctx: click.Context) -> Iterator[tuple[str, click.Command]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            yield name, command


def render(command: click.Command, ctx: click.Context, version: str) -> str:
    """The man page of ``command`` (its context names it: ``hpcstage status``)."""
    name = ctx.command_path.replace(" ", "-")
    lines = [
        f'.TH "{escape(name.upper())}" 1 "" "{PROG} {escape(version)}" "{MANUAL}"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(command.get_short_help_str(limit=200))}",
        ".SH SYNOPSIS",
        *_synopsis(command, ctx),
        ".SH DESCRIPTION",
        *_description(command),
        ".SH OPTIONS",
        *_options(command, ctx),
    ]
    if isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        for sub_name, sub in _subcommands(command, ctx):
            sub_ctx = _context(sub, sub_name, ctx)
            lines += _summary(sub, sub_ctx) if ctx.parent is None else _section(sub, sub_ctx)
    if ctx.parent is not None:
        lines += [".SH SEE ALSO", ".BR hpcstage (1)"]
    return "\n".join(lines) + "\n"


def _summary(command: click.Command, ctx: click.Context) -> list[str]:
    """A command on the main page: its name, the page that describes it, and its summary."""
    page = escape(ctx.command_path.replace(" ", "-"))
    return [".TP", f".BR {page} (1)", escape(command.get_short_help_str(limit=200))]


def _context(
    command: click.Command, name: str, parent: click.Context | None = None
) -> click.Context:
    """The context ``--help`` would have (its settings: ``-h`` as well as ``--help``)."""
    return click.Context(command, info_name=name, parent=parent, **command.context_settings)


def pages(version: str) -> dict[str, str]:
    """File name → page: ``hpcstage.1`` and ``hpcstage-COMMAND.1`` per visible command."""
    root = _context(cli, PROG)
    found = {f"{PROG}.1": render(cli, root, version)}
    for name, command in _subcommands(cli, root):
        found[f"{PROG}-{name}.1"] = render(command, _context(command, name, root), version)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m hpcstage.cli.manpages DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for file_name, text in pages(importlib.metadata.version(PROG)).items():
        (out / file_name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
