"""Reading the site TOML into :class:`~hpcstage.config.schema.Settings`, and writing it back.

``load_config(path)`` returns :class:`Settings` or raises :class:`~hpcstage.errors.ConfigError`
whose ``problems`` name the file, line and dotted key of *each* mistake, e.g.::

    site.toml:14: cache.high_watermark: must be greater than cache.low_watermark (0.8), got 0.7
    site.toml:3: store.endpint_url: unknown key (did you mean 'endpoint_url'?)
    site.toml: store: missing required section

Secrets are refused anywhere in the file (see :mod:`hpcstage.config.problems`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from hpcstage.config.problems import Problem, find_problems, syntax_problem
from hpcstage.config.schema import Settings
from hpcstage.config.tomlfile import dumps
from hpcstage.errors import ConfigError


def load_config(path: Path) -> Settings:
    """Read and validate the site TOML at ``path``.

    Raises :class:`ConfigError` whose ``problems`` lists every mistake (an unreadable file is one).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        problem = f"{path}: cannot read: {exc.strerror or exc}"
        raise ConfigError(problem, problems=[problem]) from exc
    return parse_config(data, str(path))


def check_config(path: Path) -> list[str]:
    """Return every problem in the site TOML at ``path``; an empty list means it is valid."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []


def parse_config(text: str | bytes, source: str = "<config>") -> Settings:
    """Validate TOML ``text``; ``source`` names it in messages. Raises :class:`ConfigError`."""
    settings, problems = _validate(text, source)
    if settings is None:
        shown = "\n  ".join(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"invalid configuration {source} ({count}):\n  {shown}", problems)
    return settings


def _validate(text: str | bytes, source: str) -> tuple[Settings | None, list[str]]:
    settings, problems = validate(text)
    return settings, [p.render(source) for p in problems]


def validate(text: str | bytes) -> tuple[Settings | None, list[Problem]]:
    """The settings of TOML ``text``, or None and every problem of it (in line order)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, [Problem((), f"not UTF-8 text (byte {exc.start})")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [syntax_problem(exc, text)]
    problems = find_problems(data, text)
    if problems:
        return None, problems
    return Settings.model_validate(data), []


def settings_as_dict(settings: Settings, *, human: bool = False) -> dict[str, Any]:
    """JSON-ready settings: sizes in bytes, durations in seconds, or "64MiB"/"15m" if ``human``."""
    return settings.model_dump(mode="json", context={"human": human})


def render_toml(settings: Settings) -> str:
    """The effective settings as TOML that loads back to the same :class:`Settings`."""
    return dumps(settings_as_dict(settings, human=True))
