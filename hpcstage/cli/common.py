"""Options and helpers shared by CLI commands."""

from __future__ import annotations

from pathlib import Path

import click

from hpcstage.config import Settings, load_config
from hpcstage.errors import ConfigError

ENV_VAR = "HPCSTAGE_CONFIG"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar=ENV_VAR,
    show_envvar=True,
    help="Site configuration file (TOML).",
)


def load_settings(path: Path | None) -> Settings:
    """Load the site config or fail with a message that says how to give one."""
    if path is None:
        raise ConfigError(f"no site configuration: pass --config FILE or set ${ENV_VAR}")
    return load_config(path)
