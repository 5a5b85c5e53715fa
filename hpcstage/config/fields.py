"""The value types of the site configuration's schema, and the checks behind them.

Each validator raises ValueError with a message that reads well after "key: " (the problem
renderer in :mod:`hpcstage.config.problems` puts the file, line and dotted key in front).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, SerializationInfo

from hpcstage.config import rules
from hpcstage.core.units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

KIB: Final = 2**10
MIB: Final = 2**20
GIB: Final = 2**30
TIB: Final = 2**40
MINUTE: Final = 60.0
DAY: Final = 86400.0

# Keys that name a secret. Their values are never echoed in a problem message.
CREDENTIAL_WORDS: Final = (
    "secret",
    "password",
    "passwd",
    "access_key",
    "session_token",
    "api_key",
)
CREDENTIAL_HELP: Final = (
    "looks like a credential; secrets are never read from the config file: S3 credentials come "
    "from the usual AWS sources (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials "
    "file, or the profile named by store.profile)"
)
SlurmEndState = Literal[
    "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE", "BOOT_FAIL"
]  # fmt: skip
SLURM_END_STATES: Final[tuple[str, ...]] = get_args(SlurmEndState)
DirectiveSource = Literal["admin_comment", "batch_script"]
# A finished job leaves squeue after MinJobAge (300 s by default): poll well inside that window.
MAX_POLL_INTERVAL: Final = 120.0
S3_MIN_PART: Final = 5 * MIB
S3_MAX_PART: Final = 5 * GIB


def _human(render: Callable[[Any], str]) -> PlainSerializer:
    """Serialize as a number, or as "64MiB"/"15m" when rendering TOML (context ``human``)."""

    def serialize(value: Any, info: SerializationInfo) -> Any:
        return render(value) if (info.context or {}).get("human") else value

    return PlainSerializer(serialize)


Size = Annotated[int, BeforeValidator(parse_size), _human(format_size)]
"""Bytes; accepts ``"64MiB"``, ``"1.5GB"`` or an integer."""
Rate = Annotated[int, BeforeValidator(parse_rate), _human(format_rate)]
"""Bytes per second; accepts ``"200MiB/s"``, ``"1GB/s"``, ``"64MiB"`` or an integer (0: none)."""
Duration = Annotated[float, BeforeValidator(parse_duration), _human(format_duration)]
"""Seconds; accepts ``"90s"``, ``"15m"``, ``"1h30m"`` or a number."""


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


def size_range(low: int, high: int | None = None, why: str = "") -> AfterValidator:
    """Check a size is within ``[low, high]``; ``why`` ends the message."""

    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {format_size(low)}{why}, got {format_size(value)}")
        if high is not None and value > high:
            raise ValueError(f"must be at most {format_size(high)}{why}, got {format_size(value)}")
        return value

    return AfterValidator(check)


NonEmptyStr = Annotated[str, AfterValidator(rules.non_empty)]


def _optional_str(value: Any) -> str | None:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value or None


AbsPath = Annotated[Path, BeforeValidator(rules.abs_path)]
OptionalPath = Annotated[Path | None, BeforeValidator(rules.optional_path)]
OptionalStr = Annotated[str | None, BeforeValidator(_optional_str)]


def unique_non_empty(values: list[str]) -> list[str]:
    """Check a list names something, and nothing twice."""
    if not values:
        raise ValueError("must not be empty")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"lists {', '.join(duplicates)} more than once")
    return values


def template(allowed: frozenset[str]) -> AfterValidator:
    """Check a ``str.format`` template uses only ``allowed`` placeholders, plainly."""
    return AfterValidator(lambda value: rules.template(value, allowed))


def _command(value: str) -> str:
    if value == "":
        return value  # the daemon's own hpcstage command (transport.agent_command)
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"is not a valid shell command line ({exc})") from exc
    if not words:
        raise ValueError("must not be empty")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials; " + CREDENTIAL_HELP.split("; ", 1)[1])
    return value


def _key_prefix(value: str) -> str:
    if not value.endswith("/") or value.startswith("/") or ".." in value.split("/"):
        raise ValueError(
            f"must be a relative key prefix ending in '/' without '..' parts, got {value!r}"
        )
    return value


_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _grant(value: str) -> str:
    """A policy grant: ``s3://bucket/`` or ``s3://bucket/prefix/``, or an absolute path."""
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(f"{value!r}: {bucket!r} is not a valid S3 bucket name")
        # Without the slash "s3://b/chem" would also grant "s3://b/chemistry/".
        if not value.endswith("/") or ".." in key.split("/"):
            raise ValueError(f"{value!r}: an S3 grant must end in '/' and have no '..' parts")
        return value
    if not value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"{value!r}: must be s3://bucket/prefix/ or an absolute path without '..'")
    return value


Grant = Annotated[str, AfterValidator(_grant)]


def _site_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ValueError(f"must be letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _poll_interval(value: float) -> float:
    if value > MAX_POLL_INTERVAL:
        raise ValueError(
            f"must be at most {format_duration(MAX_POLL_INTERVAL)} so no job end is missed "
            f"(finished jobs leave squeue after MinJobAge, 300s by default); "
            f"got {format_duration(value)}"
        )
    return value


SiteName = Annotated[str, AfterValidator(_site_name)]
"""Letters, digits, '.', '_' or '-'."""
HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An http:// or https:// URL with a host and no credentials."""
Command = Annotated[str, AfterValidator(_command)]
"""A shell command line, or "" for the default."""
KeyPrefix = Annotated[str, AfterValidator(_key_prefix)]
"""A relative object-key prefix ending in '/'."""
PollInterval = Annotated[PositiveDuration, AfterValidator(_poll_interval)]
"""Seconds between queue snapshots, short enough that no job end is missed."""
PartSize = Annotated[Size, size_range(S3_MIN_PART, S3_MAX_PART, " (S3's part size limits)")]
"""The part size of multipart transfers, within S3's limits."""
