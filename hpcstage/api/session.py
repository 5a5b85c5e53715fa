"""Browser sessions for the dashboard: signed, short-lived tokens (pure, no I/O).

A browser cannot make MUNGE credentials, so the CLI does it for the user: ``hpcstage
dashboard`` asks the API (with MUNGE) for a *login* token, valid for a minute and once,
and prints a URL carrying it. Opening that URL trades the token for a *session* cookie
(HttpOnly, SameSite=Strict) valid for some hours. Both are the same shape,
``<base64url(JSON claims)>.<base64url(HMAC-SHA256)>``, signed with a key the daemon draws
at start-up and never writes down: a restart (or an HA takeover) ends every session, and
people log in again. The kind is part of the signed claims, so a session cookie is never
accepted as a login token or the other way round.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from hpcstage.errors import AuthError

LOGIN_SECONDS = 60
SESSION_SECONDS = 8 * 3600
COOKIE = "hpcstage_session"


@dataclass(frozen=True)
class Claims:
    """Who a token speaks for, what kind it is, and until when."""

    kind: str  # "login" or "session"
    uid: int
    expires: float
    nonce: str


def new_key() -> bytes:
    """A fresh signing key (kept in memory only)."""
    return secrets.token_bytes(32)


def issue(key: bytes, kind: str, uid: int, now: float) -> str:
    """A signed token of ``kind`` for ``uid``."""
    lifetime = LOGIN_SECONDS if kind == "login" else SESSION_SECONDS
    body = {"k": kind, "u": uid, "e": round(now + lifetime, 3), "n": secrets.token_hex(8)}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_b64(_mac(key, payload))}"


def verify(key: bytes, token: str, kind: str, now: float) -> Claims:
    """The claims of a genuine, unexpired token of ``kind``; AuthError otherwise."""
    payload, _, signature = token.partition(".")
    try:
        if not hmac.compare_digest(_unb64(signature), _mac(key, payload)):
            raise ValueError("bad signature")
        body = json.loads(_unb64(payload))
        claims = Claims(str(body["k"]), int(body["u"]), float(body["e"]), str(body["n"]))
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise AuthError("invalid or tampered dashboard token") from exc
    if claims.kind != kind:
        raise AuthError(f"a {claims.kind} token is not a {kind} token")
    if claims.expires < now:
        raise AuthError(f"the dashboard {kind} has expired: run `hpcstage dashboard` again")
    return claims


class OnceOnly:
    """Nonces of login tokens already used, kept until they would have expired anyway."""

    def __init__(self) -> None:
        self._used: dict[str, float] = {}

    def spend(self, claims: Claims, now: float) -> None:
        """Mark ``claims`` used; AuthError if it was already."""
        self._used = {n: e for n, e in self._used.items() if e >= now}
        if claims.nonce in self._used:
            raise AuthError("this login link was already used: run `hpcstage dashboard` again")
        self._used[claims.nonce] = claims.expires


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
