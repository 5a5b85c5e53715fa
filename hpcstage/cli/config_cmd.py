"""``hpcstage config check|show|systemd-unit``: validate the site TOML, print its effective
settings, write a systemd unit running the daemon on it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import click

from hpcstage.config import paths
from hpcstage.config.load import parse_config, render_toml, settings_as_dict, validate
from hpcstage.config.problems import Problem
from hpcstage.config.schema import Settings
from hpcstage.errors import ConfigError
from hpcstage.service.unit import render_unit

ENV_VAR = paths.ENV_VAR

_file_argument = click.argument(
    "file", required=False, type=click.Path(dir_okay=True, path_type=Path)
)
_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar=ENV_VAR,
    show_envvar=True,
    help=f"Site configuration file, used when FILE is not given [default: {paths.DEFAULT}].",
)


@click.group("config")
def config() -> None:
    """Check or show the site configuration (one TOML file).

    The file is FILE, else --config, else $HPCSTAGE_CONFIG, else /etc/hpcstage/site.toml.
    See docs/configuration.md for
    every key and examples/site.toml for a complete, commented file.

    \b
    Examples:
      hpcstage config check /etc/hpcstage/site.toml
      HPCSTAGE_CONFIG=/etc/hpcstage/site.toml hpcstage config show --json
    """


@config.command("check")
@_file_argument
@_config_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object on stdout: file, ok, and problems, each with its severity,"
    " key (null: the whole file), line (null: none) and message. Same exit status.",
)
def check(file: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Validate FILE and report every problem, each with its line and key.

    Prints "OK: FILE (site NAME, store ENDPOINT, state URL)" and exits 0 when the file is valid;
    otherwise prints one problem per line on stderr and exits 1. Exits 2 when no file is given
    or it cannot be read.

    \b
    Example:
      $ hpcstage config check site.toml
      site.toml:14: cache.high_watermark: must be greater than cache.low_watermark (0.8), got 0.7
      site.toml:3: store.endpint_url: unknown key (did you mean 'endpoint_url'?)
      $ hpcstage config check --json site.toml | jq -r '.problems[].key'
      store.endpint_url
      cache.high_watermark
    """
    if as_json:
        _check_json(file, config_path)
    path = _choose(file, config_path)
    settings = _load(path)
    site, store = settings.site, settings.store
    click.echo(f"OK: {path} (site {site.name}, store {store.endpoint_url}, state {site.state_url})")


def _check_json(file: Path | None, config_path: Path | None) -> NoReturn:
    """``config check --json``: the problems as data, the exit status of the text form."""
    try:
        path = _chosen(file, config_path)
    except ConfigError as exc:
        _report(None, [Problem((), f"{exc} (or give FILE)")], 2)
    try:
        data = path.read_bytes()
    except OSError as exc:
        _report(path, [Problem((), f"cannot read: {exc.strerror or exc}")], 2)
    _settings, problems = validate(data)
    _report(path, problems, 1 if problems else 0)


def _report(path: Path | None, problems: list[Problem], code: int) -> NoReturn:
    found = {
        "file": None if path is None else str(path),
        "ok": code == 0,
        "problems": [p.as_dict() for p in problems],
    }
    click.echo(json.dumps(found, indent=2))
    raise click.exceptions.Exit(code)


@config.command("show")
@_file_argument
@_config_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON: sizes in bytes, times in seconds."
)
def show(file: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Print the effective settings of FILE, with every default filled in.

    The TOML output loads back to the same settings; in it sizes and durations are written
    with units ("500GiB", "7d"). Paths starting with ~ are shown expanded for the current user.

    \b
    Example:
      hpcstage config show site.toml --json | jq .cache
    """
    settings = _load(_choose(file, config_path))
    if as_json:
        click.echo(json.dumps(settings_as_dict(settings), indent=2))
    else:
        click.echo(render_toml(settings), nl=False)


@config.command("systemd-unit")
@_file_argument
@_config_option
@click.option(
    "--user",
    default="hpcstage",
    show_default=True,
    help="The service account the daemon runs as.",
)
@click.option(
    "--exec",
    "executable",
    type=click.Path(path_type=Path),
    help="The hpcstage command to run (default: this one).",
)
def systemd_unit(
    file: Path | None, config_path: Path | None, user: str, executable: Path | None
) -> None:
    """Print a systemd unit that runs `hpcstage daemon --config FILE` as USER.

    It restarts the daemon after a crash, an error or a lost lock on the state (exit 1 or
    3), not while the configuration is invalid (exit 78), and stops it with SIGTERM (a
    drain: running transfers resume at the next start). FILE is not read: check it with
    `hpcstage config check`. scripts/install-prefix writes this unit into
    PREFIX/share/hpcstage/systemd/.

    \b
    Example (as root):
      hpcstage config systemd-unit /etc/hpcstage/site.toml --user hpcstage \\
        > /etc/systemd/system/hpcstage-daemon.service
      systemctl daemon-reload && systemctl enable --now hpcstage-daemon
    """
    path = Path(os.path.abspath(_choose(file, config_path)))
    if not path.exists():
        click.echo(f"hpcstage: warning: {path} does not exist (yet)", err=True)
    from hpcstage.staging.pool import own_command  # asyncssh: only this command

    command = executable or Path(own_command())
    docs = command.parent.parent / "share" / "doc" / "hpcstage" / "install.md"
    try:
        unit = render_unit(
            os.path.abspath(command), str(path), user, str(docs) if docs.is_file() else None
        )
    except ValueError as exc:
        _fail(str(exc), 2)
    click.echo(unit, nl=False)


def _choose(file: Path | None, config_path: Path | None) -> Path:
    try:
        return _chosen(file, config_path)
    except ConfigError as exc:
        _fail(f"{exc} (or give FILE)", 2)


def _chosen(file: Path | None, config_path: Path | None) -> Path:
    """FILE, --config, $HPCSTAGE_CONFIG or the default (hpcstage.config.paths)."""
    # A --config on the root group (if the main CLI grows one) counts too.
    root = click.get_current_context().find_root().params.get("config")
    return paths.site_config(file or config_path or (Path(root) if root else None))


def _load(path: Path) -> Settings:
    try:
        data = path.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", 2)
    try:
        return parse_config(data, str(path))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise click.exceptions.Exit(1) from exc


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"hpcstage: error: {message}", err=True)
    raise click.exceptions.Exit(code)
