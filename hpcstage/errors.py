"""The hpcstage exception tree, drawn once.

    HpcstageError                 every error we raise on purpose; carries a user-facing message
    ├── ConfigError               the site TOML is unreadable or invalid (lists every problem)
    ├── DirectiveError            a --stage-in/--stage-out directive is malformed (names the line)
    ├── SlurmError                a Slurm command failed or printed something we cannot parse
    ├── ClusterError              the local development cluster could not be set up or reached
    ├── StoreError                the object store refused or failed a request
    │   ├── ObjectMissingError    no such object, bucket or file (never retried)
    │   ├── ObjectChangedError    replaced since it was listed (list again, later)
    │   ├── TransientStoreError   worth retrying (5xx, SlowDown, connection reset, timeouts)
    │   └── CredentialError       never retried (expired/invalid credentials, access denied)
    ├── TransportError            a node agent could not be reached or died
    └── LimitError                a job or user asked for more than a site limit allows

Vendor exceptions are translated at the boundary with ``raise ... from`` so the
cause is kept for logs while users see one clear line.
"""

from __future__ import annotations


class HpcstageError(Exception):
    """Base of every error hpcstage raises on purpose."""


class ConfigError(HpcstageError):
    """The site configuration is invalid; ``problems`` lists each one."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class DirectiveError(HpcstageError):
    """A staging directive is malformed or refused."""


class SlurmError(HpcstageError):
    """A Slurm command failed or its output could not be understood."""


class ClusterError(HpcstageError):
    """The local development cluster could not be started, stopped or reached."""


class StoreError(HpcstageError):
    """The object store failed a request."""


class ObjectMissingError(StoreError):
    """The object, bucket or file does not exist."""


class ObjectChangedError(StoreError):
    """The object was replaced between listing and reading: list again, later."""


class TransientStoreError(StoreError):
    """A store failure that a retry with backoff may fix."""


class CredentialError(StoreError):
    """Credentials are missing, invalid, expired or lack permission; never retried."""


class TransportError(HpcstageError):
    """A node agent could not be reached, or its session died."""


class LimitError(HpcstageError):
    """A job or user asked for more than a site limit ([limits]) allows; names the limit."""
