"""A small HTTP client for the daemon's API (stdlib only: it runs inside every job)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from hpcstage import auth
from hpcstage.config import Settings
from hpcstage.errors import HpcstageError


class ApiError(HpcstageError):
    """The daemon answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """Calls to one daemon at ``base_url`` (e.g. http://127.0.0.1:8470)."""

    def __init__(
        self, base_url: str, timeout: float = 30, munge: bool = False, socket: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.munge = munge
        self.socket = socket

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, body or {})

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.munge:  # one fresh credential per request: munged refuses replays
            headers["Authorization"] = auth.header(self.socket)
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


def client_for(settings: Settings, timeout: float = 30) -> Client:
    """A client for the daemon of ``settings``, authenticating as its API requires."""
    api = settings.api
    socket = str(api.munge_socket) if api.munge_socket else None
    return Client(api_url(api.listen), timeout, munge=api.auth == "munge", socket=socket)


def api_url(listen: str) -> str:
    """The daemon's base URL: $HPCSTAGE_API, else http://<api.listen from the config>."""
    return os.environ.get("HPCSTAGE_API") or f"http://{listen}"
