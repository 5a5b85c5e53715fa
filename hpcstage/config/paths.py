"""Where the site configuration is: ``--config FILE``, else ``$HPCSTAGE_CONFIG``, else
``/etc/hpcstage/site.toml``. Standard library only (``hpcstage env`` finds the daemon with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from hpcstage.errors import ConfigError

ENV_VAR: Final = "HPCSTAGE_CONFIG"
DEFAULT: Final = "/etc/hpcstage/site.toml"  # as --help shows it
DEFAULT_PATH = Path(DEFAULT)  # where it is looked for (tests point it elsewhere)


def site_config(given: Path | None) -> Path:
    """``given`` (the flag, or the variable: click reads both into one value), else
    DEFAULT_PATH if it exists; ConfigError naming every place searched when there is none."""
    if given is not None:
        return given
    if DEFAULT_PATH.exists():
        return DEFAULT_PATH
    raise ConfigError(
        f"no site configuration: no --config FILE, ${ENV_VAR} not set,"
        f" and {DEFAULT_PATH} does not exist"
    )


def optional_site_config(given: Path | None) -> Path | None:
    """``site_config``'s answer, or None when there is none (commands that can do without)."""
    try:
        return site_config(given)
    except ConfigError:
        return None
