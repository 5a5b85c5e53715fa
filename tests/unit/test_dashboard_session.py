"""Dashboard tokens (hpcstage.api.session): signed, typed, expiring, login tokens used once."""

from __future__ import annotations

import pytest

from hpcstage.api import session
from hpcstage.errors import AuthError

KEY = b"k" * 32
NOW = 1_800_000_000.0


def test_a_token_speaks_for_its_uid_until_it_expires() -> None:
    token = session.issue(KEY, "session", 1001, NOW)
    claims = session.verify(KEY, token, "session", NOW + session.SESSION_SECONDS - 1)
    assert (claims.kind, claims.uid) == ("session", 1001)
    with pytest.raises(AuthError, match="expired"):
        session.verify(KEY, token, "session", NOW + session.SESSION_SECONDS + 1)


def test_login_tokens_live_a_minute() -> None:
    token = session.issue(KEY, "login", 1001, NOW)
    session.verify(KEY, token, "login", NOW + 59)
    with pytest.raises(AuthError, match="expired"):
        session.verify(KEY, token, "login", NOW + 61)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # the signature
        lambda t: session._b64(b'{"k":"session","u":0,"e":1e12,"n":"x"}') + "." + t.split(".")[1],
        lambda t: t.split(".")[0],  # no signature
        lambda t: "",
        lambda t: "not.base64!",
    ],
)
def test_a_changed_token_is_refused(tamper: object) -> None:
    token = session.issue(KEY, "session", 1001, NOW)
    with pytest.raises(AuthError, match="invalid or tampered"):
        session.verify(KEY, tamper(token), "session", NOW)  # type: ignore[operator]


def test_another_key_or_uid_cannot_be_claimed() -> None:
    token = session.issue(KEY, "session", 1001, NOW)
    with pytest.raises(AuthError, match="tampered"):
        session.verify(b"x" * 32, token, "session", NOW)  # e.g. after a daemon restart


def test_a_session_cookie_is_not_a_login_token_nor_the_reverse() -> None:
    cookie = session.issue(KEY, "session", 1001, NOW)
    login = session.issue(KEY, "login", 1001, NOW)
    with pytest.raises(AuthError, match="not a login token"):
        session.verify(KEY, cookie, "login", NOW)
    with pytest.raises(AuthError, match="not a session token"):
        session.verify(KEY, login, "session", NOW)


def test_a_login_token_opens_one_session_only() -> None:
    once = session.OnceOnly()
    claims = session.verify(KEY, session.issue(KEY, "login", 1001, NOW), "login", NOW)
    once.spend(claims, NOW)
    with pytest.raises(AuthError, match="already used"):
        once.spend(claims, NOW + 1)
    other = session.verify(KEY, session.issue(KEY, "login", 1001, NOW), "login", NOW)
    once.spend(other, NOW + 1)  # a fresh one still works


def test_spent_nonces_are_forgotten_once_they_expired() -> None:
    once = session.OnceOnly()
    claims = session.verify(KEY, session.issue(KEY, "login", 1, NOW), "login", NOW)
    once.spend(claims, NOW)
    other = session.verify(KEY, session.issue(KEY, "login", 1, NOW + 100), "login", NOW + 100)
    once.spend(other, NOW + 100)
    assert len(once._used) == 1
