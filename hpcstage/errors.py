"""The hpcstage exception tree, drawn once.

    HpcstageError                 every error we raise on purpose; carries a user-facing message
    ├── ConfigError               the site TOML is unreadable or invalid (lists every problem)
    ├── DirectiveError            a --stage-in/--stage-out directive is malformed (names the line)
    ├── LimitError                a job or user asked for more than a site limit allows
    │   └── QuotaError            an input is larger than the job's remaining quota (agent)
    ├── SlurmError                a Slurm command failed or printed something we cannot parse
    ├── StateUnavailable          the state database (or the lock file's directory) is unreachable
    ├── AuthError                 a MUNGE credential is missing, invalid, expired or replayed
    ├── ApiError                  the daemon answered with an error or could not be reached (CLI)
    ├── StoreError                the object store refused or failed a request
    │   ├── ObjectMissingError    no such object, bucket or file (never retried)
    │   ├── ObjectChangedError    replaced since it was listed (list again, later)
    │   ├── TransientStoreError   worth retrying (5xx, SlowDown, connection reset, timeouts)
    │   └── CredentialError       never retried (expired/invalid credentials, access denied)
    ├── TransportError            a node agent could not be reached or died
    ├── AgentError                the agent ran a call and reports that it failed (maybe transient)
    │   └── ProtocolError         a message does not have the shape its type declares
    ├── CacheError                the node cache refused or failed an operation
    │   └── FencedError           a newer daemon's agent owns the node cache: this agent stops
    ├── PackError                 a packed dataset is malformed, missing or cannot be written
    ├── PermissionRefused         the job's user may not read a path they asked to stage (agent)
    ├── AccessError               the job's user cannot be given access to its directory (agent)
    └── UnsafeFileError           a job's output cannot be read safely now (agent, stage-out)

Vendor exceptions are translated at the boundary with ``raise ... from`` so the
cause is kept for logs while users see one clear line.

Only the standard library may be imported here: ``hpcstage env`` imports this module and must
stay light. Exceptions used only for control flow inside one module (e.g. the fast GET's
fallback signal) stay private to that module; the development cluster's error lives in
``devcluster/``.
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


class LimitError(HpcstageError):
    """A job or user asked for more than a site limit ([limits]) allows; names the limit."""


class QuotaError(LimitError):
    """An input is larger than the job's remaining quota."""


class SlurmError(HpcstageError):
    """A Slurm command failed or its output could not be understood."""


class StateUnavailable(HpcstageError):
    """The state database (or the lock file's directory) cannot be reached."""


class AuthError(HpcstageError):
    """The credential is missing, invalid, expired or replayed."""


class ApiError(HpcstageError):
    """The daemon answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


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


class AgentError(HpcstageError):
    """The agent ran the call and reports that it failed (message is for users).

    ``transient`` is True when a retry later may succeed (the store was down or throttling).
    ``node_only`` is True when the failure is the node's own (its disk full or failing, its
    cache or its quota), so another node may well succeed; False when the data itself is at
    fault (missing, refused, corrupt, over a job's limit) and every node would fail alike.
    """

    def __init__(self, message: str, transient: bool = False, node_only: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.node_only = node_only


class ProtocolError(AgentError):
    """A message does not have the shape its type declares (never transient: a retry sends
    the same message again)."""


class CacheError(HpcstageError):
    """The node cache refused or failed an operation (bad size, unsafe path, vanished object)."""


class FencedError(CacheError):
    """A newer leader epoch is recorded in the node cache than the one this agent serves
    (core/fencing.py): the agent refuses the call or the write, and exits."""


class PackError(HpcstageError):
    """A packed dataset (docs/packed-datasets.md) is malformed, corrupt, missing a version, or
    cannot be written; the message names the dataset and the part."""


class PermissionRefused(HpcstageError):
    """The job's user may not read a path they asked to stage."""


class AccessError(HpcstageError):
    """The job's user cannot be given access to its directory (no ACL support)."""


class UnsafeFileError(HpcstageError):
    """A listed output cannot be read safely now (replaced, special, someone else's)."""
