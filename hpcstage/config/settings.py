"""The site configuration: one TOML file, typed with pydantic, checked with every problem reported.

``load_config(path)`` returns :class:`Settings` or raises :class:`~hpcstage.errors.ConfigError`
whose ``problems`` name the file, line and dotted key of *each* mistake, e.g.::

    site.toml:14: cache.high_watermark: must be greater than cache.low_watermark (0.8), got 0.7
    site.toml:3: store.endpint_url: unknown key (did you mean 'endpoint_url'?)
    site.toml: store: missing required section

``tomllib`` gives no positions for keys, so :func:`locate_keys` scans the text for table headers and
``key =`` lines. Secrets are refused anywhere in the file: S3 credentials come from the usual AWS
sources and a PostgreSQL password from libpq's (``~/.pgpass``, ``PGPASSWORD``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

from hpcstage.config import rules
from hpcstage.core.units import format_duration, format_size, parse_duration, parse_size
from hpcstage.errors import ConfigError

Loc = tuple[str | int, ...]
"""A path into the TOML document: ``("policy", "rules", 0, "read")``."""

KIB: Final = 2**10
MIB: Final = 2**20
GIB: Final = 2**30
TIB: Final = 2**40
MINUTE: Final = 60.0
DAY: Final = 86400.0

# Keys that name a secret. Their values are never echoed in a problem message.
_CREDENTIAL_WORDS: Final = (
    "secret",
    "password",
    "passwd",
    "access_key",
    "session_token",
    "api_key",
)
_CREDENTIAL_HELP: Final = (
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


# ---------------------------------------------------------------------------------------------
# Field types. Each validator raises ValueError with a message that reads well after "key: ".
# ---------------------------------------------------------------------------------------------


def _human(render: Callable[[Any], str]) -> PlainSerializer:
    """Serialize as a number, or as "64MiB"/"15m" when rendering TOML (context ``human``)."""

    def serialize(value: Any, info: SerializationInfo) -> Any:
        return render(value) if (info.context or {}).get("human") else value

    return PlainSerializer(serialize)


Size = Annotated[int, BeforeValidator(parse_size), _human(format_size)]
"""Bytes; accepts ``"64MiB"``, ``"1.5GB"`` or an integer."""
Duration = Annotated[float, BeforeValidator(parse_duration), _human(format_duration)]
"""Seconds; accepts ``"90s"``, ``"15m"``, ``"1h30m"`` or a number."""


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


def _size_range(low: int, high: int | None = None, why: str = "") -> AfterValidator:
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


def _unique_non_empty(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("must not be empty")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"lists {', '.join(duplicates)} more than once")
    return values


def _template(allowed: frozenset[str]) -> AfterValidator:
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
        raise ValueError("must not contain credentials; " + _CREDENTIAL_HELP.split("; ", 1)[1])
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


# ---------------------------------------------------------------------------------------------
# The schema.
# ---------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # strict: TOML has real types, so "22" for a port is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SiteSettings(_Section):
    """``[site]``: who this site is and where the daemon keeps its state."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, AfterValidator(_site_name)]
    """Short site name, shown in logs, metrics and the dashboard."""
    state_dir: AbsPath = Path("/var/lib/hpcstage")
    """Daemon working directory: the SQLite database and the audit log."""
    state_url: str = Field(default="", validate_default=True)
    """SQLAlchemy URL of the state database; "" means sqlite:///<state_dir>/state.db."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Daemon log level."""

    @field_validator("state_url")
    @classmethod
    def _resolve_state_url(cls, value: str, info: ValidationInfo) -> str:
        if value == "":
            state_dir = info.data.get("state_dir")
            return f"sqlite:///{state_dir}/state.db" if state_dir else value
        # The drivers installed with hpcstage: Python's sqlite3 and psycopg 3. A plain
        # postgresql:// would make SQLAlchemy look for psycopg2.
        value = re.sub(r"^postgresql://", "postgresql+psycopg://", value)
        if not re.match(r"(sqlite(\+pysqlite)?|postgresql\+psycopg)://", value):
            raise ValueError(
                f'must be a sqlite:/// or postgresql+psycopg:// URL (or ""), got {value!r}'
            )
        if urlsplit(value).password:
            raise ValueError(
                "must not contain a password: libpq reads it from ~/.pgpass or PGPASSWORD"
            )
        return value


class StoreSettings(_Section):
    """``[store]``: the site's S3 object store. Credentials never come from this file."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: Annotated[str, AfterValidator(_http_url)]
    """S3 endpoint, http:// or https://."""
    region: str = ""
    """Region sent in request signatures; "" = AWS_REGION, AWS_DEFAULT_REGION or the
    profile's region, else us-east-1."""
    profile: OptionalStr = None
    """AWS profile to take credentials from; "" (None) = the default AWS credential chain."""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    """Bucket addressing: path (endpoint/bucket/key), virtual (bucket.endpoint/key) or auto."""
    verify_tls: bool = True
    """Verify the store's TLS certificate."""
    ca_bundle: OptionalPath = None
    """CA bundle to verify it with; "" (None) = the system's."""
    max_connections: int = Field(default=128, ge=1)
    """Connection pool size per process."""
    connect_timeout: PositiveDuration = 10.0
    """Timeout to open a connection, in seconds."""
    read_timeout: PositiveDuration = 60.0
    """Timeout waiting for data on an open connection, in seconds."""


def _default_directive_sources() -> list[DirectiveSource]:
    return ["admin_comment", "batch_script"]


def _default_end_states() -> list[SlurmEndState]:
    # Every end state: a job killed for memory or preempted still leaves outputs someone may
    # need, and what is not staged out is deleted with the job directory.
    return [
        "COMPLETED",
        "FAILED",
        "TIMEOUT",
        "CANCELLED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "DEADLINE",
        "BOOT_FAIL",
    ]


class SlurmSettings(_Section):
    """``[slurm]``: how the daemon reads the queue."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["cli"] = "cli"
    """Only "cli": Slurm's own JSON output (pyslurm has no release for 22.05/24.11)."""
    bin_dir: OptionalPath = None
    """Directory holding squeue/scontrol/sbatch; "" (None) = search PATH."""
    poll_interval: Annotated[PositiveDuration, AfterValidator(_poll_interval)] = 5.0
    """Seconds between queue snapshots; at most 120s so no job end is missed."""
    directives_from: Annotated[list[DirectiveSource], AfterValidator(_unique_non_empty)] = Field(
        default_factory=_default_directive_sources
    )
    """Where staging directives are read from, in order."""
    partitions: list[NonEmptyStr] = Field(default_factory=list)
    """Only watch jobs in these partitions; empty = all."""


class NodesSettings(_Section):
    """``[nodes]``: how the daemon reaches the agent on each compute node."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["ssh", "local"] = "ssh"
    """ssh: start the agent over SSH; local: run it as a subprocess (tests, single host)."""
    address: Annotated[str, _template(frozenset({"node", "node_addr"}))] = "{node_addr}"
    """Host to connect to; {node} is the Slurm node name, {node_addr} its NodeAddr."""
    cache_dir: Annotated[
        str, _template(rules.CACHE_DIR_PLACEHOLDERS), AfterValidator(rules.absolute_template)
    ] = rules.DEFAULT_CACHE_DIR
    """Cache directory on the node's local disk; may contain {node}."""
    agent_command: Annotated[str, AfterValidator(_command)] = ""
    """Command line that starts the agent on the node; "" = the daemon's own hpcstage
    command (its absolute path, as on the daemon's host) followed by "agent"."""
    ssh_user: NonEmptyStr = "hpcstage"
    """User the daemon logs in as."""
    ssh_port: int = Field(default=22, ge=1, le=65535)
    """SSH port on the nodes."""
    ssh_key: AbsPath = Field(default="~/.ssh/id_ed25519", validate_default=True)
    """Private key file for the SSH login."""
    ssh_known_hosts: AbsPath = Field(default="~/.ssh/known_hosts", validate_default=True)
    """known_hosts file used to verify node host keys; "" = ~/.ssh/known_hosts."""
    connect_timeout: PositiveDuration = 15.0
    """Timeout for an SSH connection, in seconds."""

    @field_validator("ssh_known_hosts", mode="before")
    @classmethod
    def _default_known_hosts(cls, value: Any) -> Any:
        return "~/.ssh/known_hosts" if value == "" else value


class CacheSettings(_Section):
    """``[cache]``: the node-local cache, per node."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: Annotated[Size, _size_range(1)] = 500 * GIB
    """Bytes the cache may use on each node."""
    max_objects: int = Field(default=10_000_000, ge=0)
    """Objects (files, hence inodes) the cache may hold on each node; 0 = no limit."""
    low_watermark: float = Field(default=0.80, gt=0, lt=1)
    """Eviction stops when usage falls below this fraction of max_bytes."""
    high_watermark: float = Field(default=0.90, gt=0, le=1, validate_default=True)
    """Eviction starts when usage rises above this fraction of max_bytes."""
    ttl: PositiveDuration = 7 * DAY
    """Unused objects older than this are evicted even below the watermarks."""
    lease_grace: Duration = 15 * MINUTE
    """A job's lease on its data lasts this long after the job ends."""
    cluster_nodes: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]] = []
    """The cache cluster: nodes that hold the inputs of pending jobs Slurm has not planned
    nodes for yet (reached like compute nodes: same transport, address and cache_dir)."""

    @field_validator("high_watermark")
    @classmethod
    def _above_low(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("low_watermark")
        if low is not None and value <= low:
            raise ValueError(f"must be greater than cache.low_watermark ({low}), got {value}")
        return value


class TransferSettings(_Section):
    """``[transfer]``: how agents move bytes."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=64, ge=1, le=4096)
    """Concurrent object transfers per node."""
    part_size: Annotated[
        Size, _size_range(S3_MIN_PART, S3_MAX_PART, " (S3's part size limits)")
    ] = 64 * MIB
    """Part size of multipart transfers."""
    multipart_threshold: Size = Field(default=256 * MIB, validate_default=True)
    """Objects at least this big are transferred in parts."""
    retries: int = Field(default=6, ge=0, le=50)
    """Retries of a transient failure before giving up."""
    backoff_base: PositiveDuration = 0.5
    """First retry delay; doubles each retry (with jitter)."""
    backoff_max: Duration = Field(default=30.0, validate_default=True)
    """Cap on the retry delay."""
    lean_get: bool = True
    """Fetch small objects (up to 1 MiB) and big objects' parts with hpcstage's own signed
    GETs, not the SDK."""
    peer_copy: bool = True
    """Copy small objects another node's cache holds instead of fetching them from the store."""
    direct_writes: bool = True
    """Write the parts of big objects not checked by an MD5 or SHA (which are read back)
    straight to disk (O_DIRECT) where the cache's file system allows it."""

    @field_validator("multipart_threshold")
    @classmethod
    def _not_below_part(cls, value: int, info: ValidationInfo) -> int:
        part = info.data.get("part_size")
        if part is not None and value < part:
            raise ValueError(
                f"must be at least transfer.part_size ({format_size(part)}), "
                f"got {format_size(value)}"
            )
        return value

    @field_validator("backoff_max")
    @classmethod
    def _not_below_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base")
        if base is not None and value < base:
            raise ValueError(
                f"must be at least transfer.backoff_base ({format_duration(base)}), "
                f"got {format_duration(value)}"
            )
        return value


class StageOutSettings(_Section):
    """``[stage_out]``: writing job outputs back to the store."""

    model_config = ConfigDict(extra="forbid")

    on_states: Annotated[list[SlurmEndState], AfterValidator(_unique_non_empty)] = Field(
        default_factory=_default_end_states
    )
    """Job end states after which declared outputs are written back."""
    trash_prefix: Annotated[str, AfterValidator(_key_prefix)] = ".hpcstage-trash/"
    """Prefix, inside the destination bucket, where replaced objects are kept."""
    trash_retention: PositiveDuration = 30 * DAY
    """How long replaced objects are kept before deletion."""


class ApiSettings(_Section):
    """``[api]``: the daemon's REST API, metrics and dashboard."""

    model_config = ConfigDict(extra="forbid")

    listen: Annotated[str, AfterValidator(rules.host_port)] = rules.DEFAULT_LISTEN
    """Address the API listens on, host:port."""
    url: str = Field(default="", validate_default=True)
    """URL at which jobs and users reach the API; "" = http://<listen>."""
    admins: list[NonEmptyStr] = Field(default_factory=lambda: ["root"])
    """User names with admin rights in the API."""
    auth: Literal["munge", "none"] = rules.DEFAULT_API_AUTH  # the choices: rules.API_AUTHS
    """How API clients prove who they are: a MUNGE credential per request, or not at all."""
    munge_socket: OptionalPath = None
    """munged's socket; unset = MUNGE's default (/run/munge/munge.socket.2)."""
    metrics_token_file: OptionalPath = None
    """File holding the token a Prometheus scraper sends as a Bearer; unset = admins only."""

    @field_validator("url")
    @classmethod
    def _client_url(cls, value: str, info: ValidationInfo) -> str:
        value = rules.optional_http_url(value)
        listen = info.data.get("listen")
        if listen is not None:  # else listen's own error is reported
            rules.client_url(listen, value)
        return value

    @property
    def host(self) -> str:
        """The host part of ``listen``, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])


class PolicyRule(_Section):
    """One ``[[policy.rules]]`` entry: what some accounts/users may read and write."""

    model_config = ConfigDict(extra="forbid")

    accounts: list[NonEmptyStr] = Field(default_factory=list)
    """Slurm accounts this rule applies to ("*" = all)."""
    users: list[NonEmptyStr] = Field(default_factory=list, validate_default=True)
    """User names this rule applies to ("*" = all)."""
    read: list[Grant] = Field(default_factory=list)
    """s3://bucket/prefix/ or absolute shared-filesystem paths they may stage in."""
    write: list[Grant] = Field(default_factory=list)
    """s3://bucket/prefix/ or absolute shared-filesystem paths they may stage out to."""
    shared: bool = False
    """Staged datasets are readable by the account's group on the nodes."""

    @field_validator("users")
    @classmethod
    def _someone(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # A field validator, not a model one, so it still runs when another key of the rule is bad.
        if not value and info.data.get("accounts") == []:
            raise ValueError("either accounts or users must be non-empty")
        return value


class PolicySettings(_Section):
    """``[policy]``: who may stage what."""

    model_config = ConfigDict(extra="forbid")

    default: Literal["deny", "allow"] = "deny"
    """deny: only what a rule grants; allow: no authorization checks (single-user sites)."""
    rules: list[PolicyRule] = Field(default_factory=list)
    """The grants."""


class QuotaSettings(_Section):
    """``[quotas]``: limits on cache use; 0 = unlimited."""

    model_config = ConfigDict(extra="forbid")

    account_bytes_per_node: Size = 0
    """Default cache bytes an account may hold on one node."""
    max_job_bytes: Size = 0
    """Bytes one job may stage in."""
    accounts: dict[NonEmptyStr, Size] = Field(default_factory=dict)
    """Per-account overrides of account_bytes_per_node."""


class LimitSettings(_Section):
    """``[limits]``: what one job or user can make the service do; 0 = unlimited."""

    model_config = ConfigDict(extra="forbid")

    stage_in_objects: int = Field(default=1_000_000, ge=0)
    """Objects one job may stage in, all its stage-ins together."""
    stage_out_files: int = Field(default=1_000_000, ge=0)
    """Files one job may stage out, all its stage-outs together."""
    stage_out_bytes: Size = 10 * TIB
    """Bytes one job may stage out, all its stage-outs together."""
    warmups_in_flight: int = Field(default=8, ge=0)
    """Unfinished warmups one user may have at once (admins: no limit)."""
    warmups_per_minute: int = Field(default=30, ge=0)
    """Warmups one user may request in any minute (admins: no limit)."""


class Settings(_Section):
    """The whole site configuration. Only ``site`` and ``store`` are required."""

    model_config = ConfigDict(extra="forbid")

    site: SiteSettings
    store: StoreSettings
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    nodes: NodesSettings = Field(default_factory=NodesSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    stage_out: StageOutSettings = Field(default_factory=StageOutSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)


# ---------------------------------------------------------------------------------------------
# Loading and checking.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    loc: Loc
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        key = dotted(self.loc)
        message = _capped(self.message)
        return f"{where}: {key}: {message}" if key else f"{where}: {message}"


def _capped(text: str, limit: int = 300) -> str:
    """A problem line stays one readable line, whatever value it quotes."""
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else f"{safe[:limit]}... ({len(text)} characters)"


def load_config(path: Path) -> Settings:
    """Read and validate the site TOML at ``path``.

    Raises :class:`ConfigError` whose ``problems`` lists every mistake (an unreadable file is one).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        problem = f"{path}: cannot read: {exc.strerror or exc}"
        raise ConfigError(problem, problems=[problem]) from exc
    return parse_config(data, str(path))


def check_config(path: Path) -> list[str]:
    """Return every problem in the site TOML at ``path``; an empty list means it is valid."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []


def parse_config(text: str | bytes, source: str = "<config>") -> Settings:
    """Validate TOML ``text``; ``source`` names it in messages. Raises :class:`ConfigError`."""
    settings, problems = _validate(text, source)
    if settings is None:
        shown = "\n  ".join(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise ConfigError(f"invalid configuration {source} ({count}):\n  {shown}", problems)
    return settings


def _validate(text: str | bytes, source: str) -> tuple[Settings | None, list[str]]:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, [f"{source}: not UTF-8 text (byte {exc.start})"]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_problem(exc, text, source)]
    problems = _problems(data, text)
    if problems:
        return None, [p.render(source) for p in problems]
    return Settings.model_validate(data), []


def _problems(data: dict[str, Any], text: str) -> list[_Problem]:
    secrets = set(_credential_locs(data))
    found = [_Problem(loc, _CREDENTIAL_HELP) for loc in sorted(secrets, key=str)]
    try:
        Settings.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        found += [_from_pydantic(e) for e in errors if tuple(e["loc"]) not in secrets]
    lines = locate_keys(text)
    placed = [_Problem(p.loc, p.message, _line_of(p.loc, lines)) for p in found]
    return sorted(placed, key=lambda p: p.line if p.line is not None else math.inf)


def _syntax_problem(exc: tomllib.TOMLDecodeError, text: str, source: str) -> str:
    message = str(exc)
    # Python 3.14 exposes lineno/colno; older versions only put them at the end of the message.
    match = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    line, column = (int(match[1]), int(match[2])) if match else (None, None)
    message = message[: match.start()] if match else message
    if message.endswith(" (at end of document)"):
        message, line = message.removesuffix(" (at end of document)"), len(text.splitlines())
    line = getattr(exc, "lineno", line)
    column = getattr(exc, "colno", column)
    where = f"{source}:{line}" if line else source
    suffix = f" (column {column})" if column else ""
    return f"{where}: invalid TOML: {getattr(exc, 'msg', message)}{suffix}"


# ---------------------------------------------------------------------------------------------
# Turning pydantic's errors into messages in TOML's vocabulary.
# ---------------------------------------------------------------------------------------------

_TYPE_MESSAGES: Final = {
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
}


def _from_pydantic(error: ErrorDetails) -> _Problem:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    if kind == "missing":
        return _Problem(loc, "missing required " + ("section" if len(loc) == 1 else "key"))
    if kind == "extra_forbidden":
        return _Problem(loc, _unknown_key(loc, value))
    if kind == "value_error":
        return _Problem(loc, str(error.get("ctx", {}).get("error", error["msg"])))
    message = _TYPE_MESSAGES.get(kind) or error["msg"].replace("Input should be", "must be", 1)
    return _Problem(loc, f"{message}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _unknown_key(loc: Loc, value: Any) -> str:
    what = "unknown section" if isinstance(value, dict) and len(loc) == 1 else "unknown key"
    key = str(loc[-1])
    close = difflib.get_close_matches(key, _field_names(loc[:-1]), n=1, cutoff=0.6)
    if close:
        return f"{what} (did you mean {close[0]!r}?)"
    homes = [dotted(section) for section in _sections_with(key)]
    return f"{what} (it belongs in [{homes[0]}])" if homes else what


def _field_names(loc: Loc) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # an element of a list of tables: same model as the list
        field = model.model_fields.get(part)
        inner = _inner_model(field.annotation) if field else None
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation if issubclass(annotation, BaseModel) else None
    for arg in get_args(annotation):
        if (found := _inner_model(arg)) is not None:
            return found
    return None


def _sections_with(key: str) -> Iterator[Loc]:
    for name, field in Settings.model_fields.items():
        model = _inner_model(field.annotation)
        if model is not None and key in model.model_fields:
            yield (name,)


def _credential_locs(data: Mapping[str, Any], path: Loc = ()) -> Iterator[Loc]:
    if path == ("quotas", "accounts"):
        return  # account names, not settings
    for key, value in data.items():
        loc = (*path, key)
        if any(word in key.lower().replace("-", "_") for word in _CREDENTIAL_WORDS):
            yield loc
        elif isinstance(value, dict):
            yield from _credential_locs(value, loc)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _credential_locs(item, (*loc, index))


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def dotted(loc: Loc) -> str:
    """Render a location as a dotted key: ``policy.rules[0].read``, ``quotas.accounts."a.b"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{name}" if out else name
    return out


# ---------------------------------------------------------------------------------------------
# Where is a key? A small scanner of TOML text (tomllib keeps no positions).
# ---------------------------------------------------------------------------------------------

_KEY_PART: Final = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")


def locate_keys(text: str) -> dict[Loc, int]:
    """Map each table and key path in TOML ``text`` to the 1-based line that defines it.

    Tracks ``[table]`` and ``[[array.of.tables]]`` headers (elements get indices, as in pydantic's
    error locations) and dotted keys; skips multi-line strings and arrays. Good enough for
    hand-written files: anything it cannot follow simply has no line.
    """
    scanner = _Locator()
    for number, line in enumerate(text.splitlines(), start=1):
        scanner.feed(line, number)
    return scanner.lines


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc``, else of its nearest enclosing table or key that is in the file."""
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _parse_key(text: str, pos: int = 0) -> tuple[list[str], int] | None:
    """Parse a (dotted, possibly quoted) key at ``pos``; return its parts and the end position."""
    parts: list[str] = []
    while match := _KEY_PART.match(text, pos):
        parts.append(next(group for group in match.groups() if group is not None))
        pos = match.end()
        if not text.startswith(".", pos):
            return parts, pos
        pos += 1
    return None


class _ValueScanner:
    """Follows strings and brackets so lines inside multi-line values are not taken for keys."""

    def __init__(self) -> None:
        self.depth = 0
        self.string: str | None = None  # the delimiter of an open multi-line string

    def open(self) -> bool:
        return self.depth > 0 or self.string is not None

    def scan(self, text: str) -> None:
        pos = 0
        while pos < len(text):
            pos = self._close_string(text, pos) if self.string else self._step(text, pos)

    def _close_string(self, text: str, pos: int) -> int:
        assert self.string is not None
        end = text.find(self.string, pos)
        if end < 0:
            return len(text)
        self.string = None
        return end + 3

    def _step(self, text: str, pos: int) -> int:
        char = text[pos]
        if char == "#":
            return len(text)
        if text.startswith(('"""', "'''"), pos):
            self.string = text[pos : pos + 3]
            return pos + 3
        if char in "\"'":
            return _skip_string(text, pos)
        self.depth += (char in "[{") - (char in "]}")
        return pos + 1


def _skip_string(text: str, pos: int) -> int:
    quote, pos = text[pos], pos + 1
    while pos < len(text) and text[pos] != quote:
        pos += 2 if quote == '"' and text[pos] == "\\" else 1
    return pos + 1


class _Locator:
    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.table: Loc = ()
        self.arrays: dict[Loc, int] = {}  # array-of-tables path -> index of its last element
        self.value = _ValueScanner()

    def feed(self, line: str, number: int) -> None:
        if self.value.open():
            self.value.scan(line)
            return
        stripped = line.strip()
        if stripped.startswith("[["):
            self._array_header(stripped[2:], number)
        elif stripped.startswith("["):
            self._table_header(stripped[1:], number)
        elif stripped and not stripped.startswith("#"):
            self._key_value(stripped, number)

    def _resolve(self, parts: list[str]) -> Loc:
        """Insert array-of-tables indices: policy.rules.x -> ("policy", "rules", 2, "x")."""
        out: Loc = ()
        for part in parts:
            out = (*out, part)
            if out in self.arrays:
                out = (*out, self.arrays[out])
        return out

    def _table_header(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed:
            self.table = self._resolve(parsed[0])
            self._record(self.table, number)

    def _array_header(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed:
            array = (*self._resolve(parsed[0][:-1]), parsed[0][-1])
            self.arrays[array] = self.arrays.get(array, -1) + 1
            self.table = (*array, self.arrays[array])
            self._record(self.table, number)

    def _key_value(self, text: str, number: int) -> None:
        parsed = _parse_key(text)
        if parsed and text.startswith("=", parsed[1]):
            self._record((*self.table, *parsed[0]), number)
            self.value.scan(text[parsed[1] + 1 :])

    def _record(self, loc: Loc, number: int) -> None:
        # A dotted key or header also defines its parent tables, which may have no header.
        for end in range(1, len(loc) + 1):
            self.lines.setdefault(loc[:end], number)


# ---------------------------------------------------------------------------------------------
# Rendering the effective settings.
# ---------------------------------------------------------------------------------------------


def settings_as_dict(settings: Settings, *, human: bool = False) -> dict[str, Any]:
    """JSON-ready settings: sizes in bytes, durations in seconds, or "64MiB"/"15m" if ``human``."""
    return settings.model_dump(mode="json", context={"human": human})


def render_toml(settings: Settings) -> str:
    """The effective settings as TOML that loads back to the same :class:`Settings`."""
    data = settings_as_dict(settings, human=True)
    lines: list[str] = []
    for name, section in data.items():
        lines += _toml_table(f"[{name}]", (name,), section)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(header: str, path: tuple[str, ...], table: dict[str, Any]) -> list[str]:
    lines = ["", header]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not _nested(v)]
    for key, value in table.items():
        sub = (*path, key)
        name = ".".join(_toml_key(p) for p in sub)
        if isinstance(value, dict):
            lines += _toml_table(f"[{name}]", sub, value)
        elif _nested(value):
            for item in value:
                lines += _toml_table(f"[[{name}]]", sub, item)
    return lines


def _nested(value: Any) -> bool:
    is_table_array = isinstance(value, list) and bool(value) and isinstance(value[0], dict)
    return isinstance(value, dict) or is_table_array


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'  # every optional setting spells "unset" as ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON's string escapes and number syntax are valid TOML.
    return json.dumps(value, ensure_ascii=False)


__all__ = [
    "SLURM_END_STATES",
    "ApiSettings",
    "CacheSettings",
    "Duration",
    "LimitSettings",
    "Loc",
    "NodesSettings",
    "PolicyRule",
    "PolicySettings",
    "QuotaSettings",
    "Settings",
    "SiteSettings",
    "Size",
    "SlurmSettings",
    "StageOutSettings",
    "StoreSettings",
    "TransferSettings",
    "check_config",
    "dotted",
    "load_config",
    "locate_keys",
    "parse_config",
    "render_toml",
    "settings_as_dict",
]
