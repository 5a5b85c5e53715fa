"""What the two lean S3 GET clients share: where a bucket's requests go, signed request bytes,
an idle connection pool, and counting (then giving up on) what they hand back.

The lean clients (hpcstage.store.lean for whole small objects, hpcstage.store.ranged for parts
of big ones) do only the happy path of one request, a signed GET answered with exactly the
listed size and ETag. Everything else (another status, a redirect, a chunked body, a size or
ETag other than listed, a network error, a timeout, a key with ``.``/``..`` segments) is a
``Fallback``: the caller does the request again through aiobotocore, whose error translation
and retries stay the one place that decides what a failure means. A client whose first
requests all fall back (a server that wants something this one does not do) turns itself off
after ``GIVE_UP_AFTER`` of them and says so in the log, so a site never pays twice.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlsplit

from hpcstage.store.sigv4 import EMPTY_SHA256, SigV4, amz_now
from hpcstage.store.throttle import Throttle

log = logging.getLogger(__name__)

GIVE_UP_AFTER: Final = 20  # fallbacks before the first success that turn the client off
HEAD_END: Final = b"\r\n\r\n"


@dataclass(frozen=True)
class Endpoint:
    """Where requests for one bucket go: TCP target, ``Host`` header and path prefix."""

    connect_host: str
    port: int
    tls: bool
    host_header: str
    path_prefix: str  # "/bucket" (path style) or "" (virtual-hosted style)

    @classmethod
    def for_bucket(cls, endpoint_url: str, bucket: str, addressing_style: str) -> Endpoint:
        """The endpoint of ``bucket``; ValueError for styles or URLs this client does not do."""
        url = urlsplit(endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.username:
            raise ValueError(f"unsupported endpoint {endpoint_url!r}")
        if url.path not in ("", "/") or url.query:
            raise ValueError(f"endpoint {endpoint_url!r} has a path")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        netloc = url.netloc.rsplit("@", 1)[-1]
        if url.port in (80, 443) and url.port == (443 if tls else 80):
            netloc = netloc.rsplit(":", 1)[0]  # SDKs sign the Host without a default port
        if addressing_style == "path":
            return cls(url.hostname, port, tls, netloc, "/" + quote(bucket, safe=""))
        if addressing_style == "virtual":
            return cls(f"{bucket}.{url.hostname}", port, tls, f"{bucket}.{netloc}", "")
        raise ValueError(f"addressing style {addressing_style!r} is left to the SDK")

    def path(self, key: str) -> str | None:
        """The request path of ``key``, or None if a server might normalize it to another."""
        if any(part in (".", "..") for part in key.split("/")):
            return None
        return f"{self.path_prefix}/{quote(key, safe='/~')}"


@dataclass
class LeanStats:
    """What the lean client did: requests it served, and those it handed back."""

    served: int = 0
    fell_back: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Fallback(Exception):
    """This request is not one for the lean path (the reason is the message)."""


class LeanClient:
    """What both lean clients hold: the endpoint, the signer, timeouts, an idle pool, counters.

    Counters are updated under a lock: RangeGet is called from worker threads.
    """

    _idle: list[Any]
    _what: str  # names the client in the log line that turns it off

    def __init__(
        self,
        endpoint: Endpoint,
        signer: SigV4,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        clock: Callable[[], str] = amz_now,
        throttle: Throttle | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.stats = LeanStats()
        self.enabled = True
        self._signer = signer
        self._ssl = ssl_context if endpoint.tls else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle = []
        self._lock = threading.Lock()
        self._clock = clock
        self._throttle = throttle or Throttle()  # the agent's rate limits (none by default)

    def _signed(self, path: str, extra: Mapping[str, str]) -> bytes:
        """The bytes of a SigV4-signed ``GET path`` with the ``extra`` headers (lowercase,
        signed)."""
        headers = {**extra, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": self._clock()}
        if self._signer.token:
            headers["x-amz-security-token"] = self._signer.token
        host = self.endpoint.host_header
        auth = self._signer.authorization("GET", host, path, "", headers)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"Authorization: {auth}", "", ""]
        return "\r\n".join(lines).encode()

    def _path(self, key: str) -> str:
        """``key``'s request path; ``Fallback`` for a key a server might normalize."""
        path = self.endpoint.path(key)
        if path is None:
            raise Fallback("dot segment in key")
        return path

    def _served(self) -> None:
        with self._lock:
            self.stats.served += 1

    def _fell_back(self, reason: str) -> None:
        """Count one fallback; a client whose requests have all fallen back so far turns
        itself off after GIVE_UP_AFTER of them, with a warning in the log."""
        with self._lock:
            if not self.enabled:
                return
            stats = self.stats
            stats.fell_back += 1
            stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
            if stats.served or stats.fell_back < GIVE_UP_AFTER:
                return
            self.enabled = False
            log.warning(
                "%s turned off for %s: its first %d requests fell back (%s); the SDK does them now",
                self._what,
                self.endpoint.host_header,
                stats.fell_back,
                ", ".join(f"{r}: {n}" for r, n in sorted(stats.reasons.items())),
            )


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and headers (lowercase names) of an HTTP/1.1 response head.

    ValueError for anything that is not one: a bad status line, a header line without a colon.
    """
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError("not an HTTP/1.x response")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers[name.lower()] = value.strip()
    return int(code), headers
