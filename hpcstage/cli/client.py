"""A small HTTP client for the daemon's API (stdlib only: it runs inside every job).

The commands that talk to the daemon (``hpcstage env``, ``status``, ``warmup``, ``cache``,
``trash``) read only what they need from the site configuration with
:func:`load_client_settings`: where the API listens, how it authenticates, munged's socket and
the node cache directory, checked by the same rules as the full schema
(:mod:`hpcstage.config.rules`). Importing that schema (pydantic) would slow the start of every
job's ``hpcstage env`` (start-up times: docs/benchmarks.md); the daemon checks the whole file
when it starts, and ``hpcstage config check FILE`` lists every problem in it.
"""

from __future__ import annotations

import json
import os
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcstage import auth
from hpcstage.config import rules
from hpcstage.errors import ApiError, ConfigError

if TYPE_CHECKING:
    from hpcstage.config.schema import Settings


class Client:
    """Calls to one daemon at ``base_url`` (e.g. http://127.0.0.1:8470)."""

    def __init__(
        self, base_url: str, timeout: float = 30, munge: bool = False, socket: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.munge = munge
        self.socket = socket
        self.for_uid: int | None = None  # an admin asking as this uid

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body or {})

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path, None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.munge:  # one fresh credential per request: munged refuses replays
            headers["Authorization"] = auth.header(self.socket)
        if self.for_uid is not None:
            headers[auth.FOR_UID_HEADER] = str(self.for_uid)
        req = urllib.request.Request(  # noqa: S310 - URL from the site config
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiError(_detail(exc), exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(
                f"cannot reach the hpcstage daemon at {self.base_url}: {reason}"
            ) from exc


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(exc.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail or f"HTTP {exc.code} {exc.reason}")


@dataclass(frozen=True)
class ApiAccess:
    """The ``[api]`` values a client needs (the same names as ``ApiSettings``)."""

    listen: str = rules.DEFAULT_LISTEN
    auth: str = rules.DEFAULT_API_AUTH
    munge_socket: Path | None = None
    url: str = ""


@dataclass(frozen=True)
class ClientSettings:
    """What the client commands read from the site configuration."""

    api: ApiAccess
    cache_dir: str = rules.DEFAULT_CACHE_DIR  # ``nodes.cache_dir``


def load_client_settings(path: Path) -> ClientSettings:
    """The client's values from the site TOML at ``path``; ConfigError names the file, the key
    and the problem (the rest of the file is the daemon's to check)."""
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        problem = f"{path}: cannot read: {exc.strerror or exc}"
        raise ConfigError(problem, problems=[problem]) from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        problem = f"{path}: not a valid TOML file ({exc}); `hpcstage config check {path}` says more"
        raise ConfigError(problem, problems=[problem]) from exc

    def value(section: str, key: str, default: str, check: Callable[[str], Any]) -> Any:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{section}: must be a table")
        raw = table.get(key, default)
        if not isinstance(raw, str):
            raise ValueError(f"{section}.{key}: must be a string, got {raw!r}")
        try:
            return check(raw)
        except ValueError as exc:
            raise ValueError(f"{section}.{key}: {exc}") from None

    def auth_mode(raw: str) -> str:
        if raw not in rules.API_AUTHS:
            raise ValueError(f"must be one of {', '.join(rules.API_AUTHS)}, got {raw!r}")
        return raw

    try:
        listen = value("api", "listen", rules.DEFAULT_LISTEN, rules.host_port)

        def url_for_clients(raw: str) -> str:
            url = rules.optional_http_url(raw)
            rules.client_url(listen, url)  # a wildcard listen needs a URL
            return url

        api = ApiAccess(
            listen=listen,
            auth=value("api", "auth", rules.DEFAULT_API_AUTH, auth_mode),
            munge_socket=value("api", "munge_socket", "", rules.optional_path),
            url=value("api", "url", "", url_for_clients),
        )
        cache_dir = value(
            "nodes",
            "cache_dir",
            rules.DEFAULT_CACHE_DIR,
            lambda raw: rules.absolute_template(rules.template(raw, rules.CACHE_DIR_PLACEHOLDERS)),
        )
    except ValueError as exc:
        problem = f"{path}: {exc}"
        raise ConfigError(problem, problems=[problem]) from None
    return ClientSettings(api, cache_dir)


def client_for(settings: Settings | ClientSettings, timeout: float = 30) -> Client:
    """A client for the daemon of ``settings``, authenticating as its API requires."""
    api = settings.api
    socket = str(api.munge_socket) if api.munge_socket else None
    url = api_url(api.listen, api.url)
    return Client(url, timeout, munge=api.auth == "munge", socket=socket)


def api_url(listen: str, url: str = "") -> str:
    """The daemon's base URL: $HPCSTAGE_API, else api.url, else http://<api.listen>."""
    return os.environ.get("HPCSTAGE_API") or rules.client_url(listen, url)
