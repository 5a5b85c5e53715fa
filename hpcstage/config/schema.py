"""The site configuration's schema: one pydantic model per TOML section, and :class:`Settings`.

Only ``[site]`` and ``[store]`` are required; every other section has defaults. The value
types and their checks are in :mod:`hpcstage.config.fields`; reading a file into
:class:`Settings` (with every problem reported) is :mod:`hpcstage.config.load`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hpcstage.config import rules
from hpcstage.config.fields import (
    DAY,
    GIB,
    MIB,
    MINUTE,
    TIB,
    AbsPath,
    Command,
    DirectiveSource,
    Duration,
    Grant,
    HttpUrl,
    KeyPrefix,
    NonEmptyStr,
    OptionalPath,
    OptionalStr,
    PartSize,
    PollInterval,
    PositiveDuration,
    Rate,
    SiteName,
    Size,
    SlurmEndState,
    size_range,
    template,
    unique_non_empty,
)
from hpcstage.core.units import format_duration, format_size
from hpcstage.retry import DEFAULT_RETRY


class _Section(BaseModel):
    # strict: TOML has real types, so "22" for a port is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SiteSettings(_Section):
    """``[site]``: who this site is and where the daemon keeps its state."""

    model_config = ConfigDict(extra="forbid")

    name: SiteName
    """Short site name, shown in logs, metrics and the dashboard."""
    state_dir: AbsPath = Path("/var/lib/hpcstage")
    """Daemon working directory: the SQLite database and the audit log."""
    state_url: str = Field(default="", validate_default=True)
    """SQLAlchemy URL of the state database; "" means sqlite:///<state_dir>/state.db."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Daemon log level."""
    log_format: Literal["auto", "text", "json", "journal"] = "auto"
    """Daemon log format: "auto" (journal under systemd, else text), "text", "json" or
    "journal"; ``hpcstage daemon --log-format`` overrides it."""

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

    endpoint_url: HttpUrl
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
    poll_interval: PollInterval = 5.0
    """Seconds between queue snapshots; at most 120s so no job end is missed."""
    directives_from: Annotated[list[DirectiveSource], AfterValidator(unique_non_empty)] = Field(
        default_factory=_default_directive_sources
    )
    """Where staging directives are read from, in order."""
    partitions: list[NonEmptyStr] = Field(default_factory=list)
    """Only watch jobs in these partitions; empty = all."""
    power_saving: bool = False
    """Read the nodes' states with every queue snapshot and stage nothing onto a node Slurm
    has powered down or is booting (docs/slurm-integration.md, "Elastic cloud nodes")."""


class NodesSettings(_Section):
    """``[nodes]``: how the daemon reaches the agent on each compute node."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["ssh", "local"] = "ssh"
    """ssh: start the agent over SSH; local: run it as a subprocess (tests, single host)."""
    address: Annotated[str, template(frozenset({"node", "node_addr"}))] = "{node_addr}"
    """Host to connect to; {node} is the Slurm node name, {node_addr} its NodeAddr."""
    cache_dir: Annotated[
        str, template(rules.CACHE_DIR_PLACEHOLDERS), AfterValidator(rules.absolute_template)
    ] = rules.DEFAULT_CACHE_DIR
    """Cache directory on the node's local disk; may contain {node}."""
    agent_command: Command = ""
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
    keepalive_interval: PositiveDuration = 15.0
    """Seconds of silence on an SSH connection before the daemon sends a keepalive."""
    keepalive_count_max: int = Field(default=4, ge=1)
    """Unanswered keepalives in a row after which the connection counts as lost."""
    rpc_idle_timeout: PositiveDuration = 60.0
    """Seconds a node's agent may stay silent while calls wait for it (it is pinged after
    half of that) before it counts as hung and its node as unreachable."""

    @field_validator("ssh_known_hosts", mode="before")
    @classmethod
    def _default_known_hosts(cls, value: Any) -> Any:
        return "~/.ssh/known_hosts" if value == "" else value


class CacheSettings(_Section):
    """``[cache]``: the node-local cache, per node."""

    model_config = ConfigDict(extra="forbid")

    max_bytes: Annotated[Size, size_range(1)] = 500 * GIB
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
    durable_before_read: bool = False
    """Flush every object to disk before a job may read it; false: objects above 1 MiB are
    readable once verified and flushed in the background (a crash re-verifies or discards
    what was not flushed yet)."""
    cluster_nodes: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]] = []
    """The cache cluster: nodes that hold the inputs of pending jobs Slurm has not planned
    nodes for yet (reached like compute nodes: same transport, address and cache_dir)."""
    hedge_nodes: int = Field(default=0, ge=0, le=16)
    """Besides its planned nodes, stage a pending job's inputs on this many nodes of its
    partition whose running jobs end first (copied from the planned node); 0 = no hedging."""
    hedge_bytes: Annotated[Size, size_range(0)] = 4 * GIB
    """Hedge only jobs whose inputs (as staged on the planned node) are at most this size."""

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
    part_size: PartSize = 64 * MIB
    """Part size of multipart transfers."""
    multipart_threshold: Size = Field(default=256 * MIB, validate_default=True)
    """Objects at least this big are transferred in parts."""
    retries: int = Field(default=DEFAULT_RETRY.retries, ge=0, le=50)
    """Retries of a transient failure before giving up."""
    backoff_base: PositiveDuration = DEFAULT_RETRY.base
    """First retry delay; doubles each retry (with jitter)."""
    backoff_max: Duration = Field(default=DEFAULT_RETRY.cap, validate_default=True)
    """Cap on the retry delay."""
    lean_get: bool = True
    """Fetch small objects (up to 1 MiB) and big objects' parts with hpcstage's own signed
    GETs, not the SDK."""
    peer_copy: bool = True
    """Copy objects another node's cache holds instead of fetching them from the store, and
    fetch a source several nodes need at once from the store once (the others copy it)."""
    peer_direct: bool = True
    """Copy objects above 1 MiB node to node (a one-time token, the daemon out of the data
    path); false: only small objects are copied, through the daemon."""
    peer_address: Annotated[str, template(frozenset({"node", "node_addr"}))] = "{node_addr}"
    """Address a node's agent listens on, for the moment of one node-to-node copy, and
    its peers connect to; {node} is the Slurm node name, {node_addr} its NodeAddr."""
    peer_groups: list[
        list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]]
    ] = []
    """Groups of nodes (a rack, a cache node and the compute nodes it serves) that each
    fetch a source from the store once and copy it only among themselves; nodes in no
    group form one more group. [] = the whole cluster is one group."""

    @field_validator("peer_groups")
    @classmethod
    def _one_group_each(cls, value: list[list[str]]) -> list[list[str]]:
        seen: set[str] = set()
        for group in value:
            twice = sorted(seen.intersection(group))
            if twice:
                raise ValueError(f"a node may be in one group only: {', '.join(twice)}")
            seen.update(group)
        return value

    direct_writes: bool = True
    """Write the parts of big objects not checked by an MD5 or SHA (which are read back)
    straight to disk (O_DIRECT) where the cache's file system allows it; only with
    cache.durable_before_read (else the job would wait for the disk)."""
    # Rate limits (docs/configuration.md, "Rate limits"); 0 = unlimited. Store traffic only:
    # peer copies and shared file system paths are not limited.
    node_download_rate: Rate = 0
    """Bytes per second one node may download from the store, all its transfers together
    (e.g. "200MiB/s")."""
    node_upload_rate: Rate = 0
    """Bytes per second one node may upload to the store, all its transfers together."""
    node_request_rate: float = Field(default=0.0, ge=0)
    """Store requests per second one node may start (GET, HEAD, LIST, PUT, ...)."""
    site_download_rate: Rate = 0
    """Bytes per second all nodes together may download; shared equally by the nodes
    transferring at the moment."""
    site_upload_rate: Rate = 0
    """Bytes per second all nodes together may upload; shared like site_download_rate."""
    site_request_rate: float = Field(default=0.0, ge=0)
    """Store requests per second all nodes together may start; shared like site_download_rate."""

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

    on_states: Annotated[list[SlurmEndState], AfterValidator(unique_non_empty)] = Field(
        default_factory=_default_end_states
    )
    """Job end states after which declared outputs are written back."""
    trash_prefix: KeyPrefix = ".hpcstage-trash/"
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
    cache_requests_per_minute: int = Field(default=10, ge=0)
    """``warmup --check`` and ``cache evict SRC`` one user may ask in any minute (admins: no
    limit); one at a time."""
    packs_in_flight: int = Field(default=2, ge=0)
    """Unfinished daemon packs (``hpcstage pack --daemon``) one user may have (admins: no limit)."""
    packs_running: int = Field(default=2, ge=1)
    """Daemon packs running at once on the daemon's host; more wait, queued."""
    pack_time_limit: Duration = DAY
    """Wall-clock time one attempt of a daemon pack may run before it is stopped (0: none)."""


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
