"""Options and helpers shared by CLI commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hpcstage.cli.client import ClientSettings, load_client_settings
from hpcstage.config import paths

if TYPE_CHECKING:
    from rich.progress import Progress

    from hpcstage.config.schema import Settings

ENV_VAR = paths.ENV_VAR

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar=ENV_VAR,
    show_envvar=True,
    help=f"Site configuration file (TOML) [default: {paths.DEFAULT}].",
)


def _given(path: Path | None) -> Path:
    return paths.site_config(path)


def load_settings(path: Path | None) -> Settings:
    """Load and check the whole site config (the daemon's and agents' view) or fail with a
    message that says how to give one."""
    # Imported here: the schema (pydantic) is a large part of a command's start-up (see
    # docs/benchmarks.md), which the commands that only talk to the daemon do not pay (see
    # load_client).
    from hpcstage.config.load import load_config

    return load_config(_given(path))


def load_client(path: Path | None) -> ClientSettings:
    """The values a command that talks to the daemon needs (hpcstage.cli.client)."""
    return load_client_settings(_given(path))


def bytes_bar(**options: Any) -> Progress:
    """A rich progress bar of bytes (description, bar, bytes done, rate, time left), as
    ``warmup`` and ``pack`` draw it. rich is imported here: its import is slow, and the commands
    that print JSON never pay for it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, **options)
