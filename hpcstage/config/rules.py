"""Checks of single configuration values, in plain Python (no pydantic).

Shared by the full schema in :mod:`hpcstage.config.schema`, which the daemon and agents load,
and by the light reading in :mod:`hpcstage.cli.client`, which the commands users run (``hpcstage
env`` in every job, ``status``, ``warmup``) use to find the daemon without paying for the schema.
Each check returns the value or raises ValueError with a message that reads well after "key: ".
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

DEFAULT_LISTEN: Final = "127.0.0.1:8470"
DEFAULT_API_AUTH: Final = "munge"
API_AUTHS: Final = ("munge", "none")
DEFAULT_CACHE_DIR: Final = "/local/hpcstage"
CACHE_DIR_PLACEHOLDERS: Final = frozenset({"node"})


def non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def abs_path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty path string, got {value!r}")
    path = Path(value).expanduser()  # "~" is the home of the user who loads the config
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path (or start with ~), got {value!r}")
    return path


def optional_path(value: Any) -> Path | None:
    return None if value == "" else abs_path(value)


def template(value: str, allowed: frozenset[str]) -> str:
    """A ``str.format`` template using only ``allowed`` placeholders, plainly."""
    names = ", ".join("{" + name + "}" for name in sorted(allowed))
    non_empty(value)
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value)]
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); placeholders: {names}") from exc
    for field, spec, conv in fields:
        if field is not None and (field not in allowed or spec or conv):
            raise ValueError(f"unknown placeholder {{{field}}}; allowed: {names}")
    return value


def absolute_template(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


def optional_http_url(value: str) -> str:
    """ "" or an http(s) URL without credentials, query or fragment (a trailing / dropped)."""
    if value == "":
        return value
    example = "e.g. http://stager.example.org:8470"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}), {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, {example}, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials (clients authenticate with MUNGE)")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {value!r}")
    return value.rstrip("/")


def client_url(listen: str, url: str) -> str:
    """Where clients reach the API: ``url`` (api.url), else http://<listen>. ValueError
    (for api.url) when that would be a wildcard address, which names no host to reach."""
    if url:
        return url
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::"):  # noqa: S104 - recognising it, not binding
        raise ValueError(
            f"must be set when api.listen ({listen}) is a wildcard address: the URL at which"
            f" jobs and users reach the daemon, e.g. http://stager.example.org:{port}"
        )
    return f"http://{listen}"


def host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:8470 or [::1]:8470), got {value!r}")
    return value
