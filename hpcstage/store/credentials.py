"""The site's S3 credentials: found by botocore's chain, renewed before they expire."""

from __future__ import annotations

import os
from typing import Any, TypeAlias

import botocore.exceptions as bce
import botocore.session

from hpcstage.errors import CredentialError

S3Credentials: TypeAlias = dict[str, str]
"""Explicit S3 credentials as the daemon hands them to agents (JSON-ready):
``access_key``, ``secret_key`` and ``token`` ("" for long-term keys)."""


def resolve_credentials(profile: str | None = None) -> S3Credentials:
    """Ask botocore's credential chain once (env, shared files, ``profile``, instance roles)."""
    return CredentialSource(profile).current()


class CredentialSource:
    """The site's S3 credentials, kept fresh for as long as the daemon runs.

    botocore's chain is asked once; what it finds for temporary credentials (STS, SSO, web
    identity, an instance role, a ``credential_process``) refreshes itself when asked within
    15 minutes of its expiry, so ``current()`` called every tick returns new keys before the
    old ones lapse, and the daemon hands them on. Long-term keys never change. Blocking (a
    refresh may ask a metadata service or run a process): call it in a thread.
    """

    def __init__(self, profile: str | None = None) -> None:
        self.profile = profile
        self._session = botocore.session.Session(profile=profile)
        self._found: Any = None

    def current(self) -> S3Credentials:
        """The credentials to sign with now; CredentialError when there are none."""
        try:
            if self._found is None:
                self._found = self._session.get_credentials()
            frozen = self._found.get_frozen_credentials() if self._found is not None else None
        except (bce.BotoCoreError, RuntimeError) as exc:
            # botocore's credential-chain messages name providers and variables, never values
            # (RuntimeError: refreshed credentials that are expired already).
            raise CredentialError(f"S3 credentials: {exc}") from exc
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            where = f"profile {self.profile!r}" if self.profile else "the environment or ~/.aws"
            raise CredentialError(f"S3 credentials: none found in {where}")
        token = frozen.token or ""
        return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "token": token}

    def region(self, configured: str) -> str:
        """``configured`` if set, else AWS_REGION / AWS_DEFAULT_REGION / the profile's region,
        else us-east-1 (what S3-compatible servers expect when they care at all)."""
        if configured or os.environ.get("AWS_REGION"):
            return configured or os.environ["AWS_REGION"]
        try:
            found = self._session.get_config_variable("region")  # AWS_DEFAULT_REGION, profile
        except bce.BotoCoreError:
            found = None
        return str(found or "us-east-1")
