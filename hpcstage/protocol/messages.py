"""One typed message per call between the daemon and a node agent, shared by both sides.

Each ``Rpc`` names a call, its request and its reply; ``hpcstage.staging.agents.AgentClient``
builds requests and reads replies on the daemon's side, ``hpcstage.agent.server`` decodes
requests before any handler runs. Encoding and strict decoding: ``hpcstage.protocol.wire``.

Request fields have no defaults on purpose: the daemon must set every field the agent reads
(mypy checks the constructor call), so a field the agent reads and the daemon never sends
cannot exist. Reply and progress fields the agent always sends have none either.

Adding a call: a request and a reply type here, an ``Rpc`` in ``CALLS``, a method on
``AgentClient``, a handler in the agent's routing table (``hpcstage.agent.server``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from hpcstage.core.directives import Source, SourceKind, parse_source
from hpcstage.core.fencing import Epoch
from hpcstage.core.filters import KeyFilter

Req = TypeVar("Req")
Rep = TypeVar("Rep")


@dataclass(frozen=True)
class Rpc(Generic[Req, Rep]):
    """A call's name on the wire and the types of its request and reply."""

    op: str
    request: type[Req]
    reply: type[Rep]


# -- shared parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """A stage-in source as the agent reads it (see ``hpcstage.core.directives.Source``)."""

    kind: SourceKind
    bucket: str
    key: str
    path: str  # absolute, for kind PATH; "" otherwise
    include: list[str]  # globs under a prefix (hpcstage.core.filters); [] = every object
    exclude: list[str]
    version_id: str  # an S3 object's pinned version; "" = the current one

    def url(self) -> str:
        """For messages: the path, or the s3:// URL with any filter or version."""
        return self.path or self.source().url

    def key_filter(self) -> KeyFilter:
        """Which objects under the prefix are staged."""
        return KeyFilter(tuple(self.include), tuple(self.exclude))

    def source(self) -> Source:
        """As a directive's source (the globs were checked when the directive was parsed)."""
        return Source(
            self.kind, self.bucket, self.key, self.path, self.key_filter(), self.version_id
        )

    @classmethod
    def of(cls, src: str) -> SourceSpec:
        """A stored source URL (a request's ``src``) as the agent reads it."""
        source = parse_source(src)
        return cls(
            kind=source.kind,
            bucket=source.bucket,
            key=source.key,
            path=source.path,
            include=list(source.filter.include),
            exclude=list(source.filter.exclude),
            version_id=source.version_id,
        )


@dataclass(frozen=True)
class Empty:
    """The request of a call that takes no parameters."""


# -- hello, credentials -----------------------------------------------------------------------


@dataclass
class AgentStoreSettings:
    """How the agent reaches the object store (the daemon's ``[store]``, as the node needs it).

    Not frozen: new ``credentials`` replace the old ones in place (``credentials`` call).
    """

    endpoint_url: str
    region: str
    addressing_style: str
    verify_tls: bool
    ca_bundle: str  # "" for the system's
    max_connections: int
    connect_timeout: float
    read_timeout: float
    credentials: dict[str, str] | None  # None: the agent's own (botocore's usual sources)


@dataclass(frozen=True)
class AgentTransferSettings:
    """The daemon's ``[transfer]`` limits the agent applies to its downloads."""

    concurrency: int
    part_size: int
    multipart_threshold: int
    retries: int
    backoff_base: float
    backoff_max: float
    lean_get: bool
    direct_writes: bool


@dataclass(frozen=True)
class AgentCacheSettings:
    """The daemon's ``[cache]`` settings the agent applies to its node cache."""

    durable_before_read: bool


@dataclass(frozen=True)
class HelloRequest:
    store: AgentStoreSettings
    transfer: AgentTransferSettings
    cache: AgentCacheSettings
    # The daemon's leader epoch (core/fencing.py), the one it started the agent with; None
    # from a daemon that counts none (tests that wire one without a state database).
    fence: Epoch | None


@dataclass(frozen=True)
class HelloReply:
    """Who answered, and what reconcile found in the cache. ``reconcile`` and ``usage`` are
    the node cache's own reports (``hpcstage.cache``), logged and shown as they are."""

    node: str
    pid: int
    reconcile: dict[str, Any]
    usage: dict[str, Any]


@dataclass(frozen=True)
class CredentialsRequest:
    credentials: dict[str, str]


@dataclass(frozen=True)
class CredentialsReply:
    retired: int  # S3 clients set aside (closed when the next credentials arrive)


# -- rate limits (docs/configuration.md, "Rate limits") ----------------------------------------


@dataclass(frozen=True)
class RateLimits:
    """What the agent may use of the store from now on, all its transfers together: its own
    limits and its share of the site's (``hpcstage.core.ratelimit.node_share``). 0: no limit.
    The request of ``rates``, and a field of every stage and stage-out call.

    ``generation`` orders them: the daemon counts up each time a share changes, and the agent
    ignores limits older than those it has (a stage call carries the share of when it began,
    and may arrive after a newer ``rates``). A daemon's hello starts the count again."""

    download: int  # bytes per second
    upload: int  # bytes per second
    requests: float  # requests started per second
    generation: int  # 0: none (no shares); the daemon counts from 1


NO_LIMITS: Final = RateLimits(download=0, upload=0, requests=0.0, generation=0)


# -- stage (stage-in and warmup) --------------------------------------------------------------


@dataclass(frozen=True)
class StageItem:
    """One input: where from, where in the view, and the budget it must fit."""

    request_id: int
    source: SourceSpec
    dest: str  # relative to the job's view
    max_bytes: int | None  # None: no quota
    quota_reason: str
    max_objects: int | None  # None: no limit
    objects_reason: str


# The job key of an admin's kept-warm dataset (``hpcstage pin``): ``pin-<id>``. Its staging has
# no user (its view is the service account's alone), the only staging that may have none.
PIN_JOB_PREFIX = "pin-"


@dataclass(frozen=True)
class StageRequest:
    """Fetch ``items`` into the cache; with ``view`` link them into the job's view (a warmup
    has none)."""

    job: str
    user: str  # given the view by ACL; "" only for a kept-warm dataset (PIN_JOB_PREFIX)
    view: bool
    items: list[StageItem]
    rates: RateLimits


@dataclass(frozen=True)
class StageProgress:
    """Counters of one input, sent while it is staged and as its result."""

    request_id: int
    files_done: int
    bytes_done: int
    files_total: int | None  # None until the listing is complete
    bytes_total: int | None
    fetched: int  # objects this input fetched from the store (packed: ranged GETs)
    fetched_bytes: int  # the bytes those fetches brought (for the daemon's /metrics)


@dataclass(frozen=True)
class StageReply:
    view: str  # the job's view directory ("" without a view)
    acl: bool  # an ACL entry was added for the job's user
    items: list[StageProgress]


# -- stage_out --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageOutItem:
    """One ``--stage-out`` directive of a finished job."""

    request_id: int
    src: str  # relative to the job's directory
    dest_bucket: str
    dest_key: str
    optional: bool
    job_completed: bool  # False: a missing source is no failure (the job ended early)
    max_files: int | None
    max_bytes: int | None
    limit_reason: str
    pack: bool  # write SRC as a new version of the packed dataset dest_key (.hpack/)
    # Who writes (job, submit time, directive): recorded in a packed version, so a retried
    # stage-out finds the version it already made instead of making another ("": not packed).
    writer: str


@dataclass(frozen=True)
class StageOutRequest:
    job: str
    user: str
    ended_at: float
    trash_prefix: str
    items: list[StageOutItem]
    rates: RateLimits


@dataclass(frozen=True)
class FileOutcome:
    """What became of one output file: ``state`` is uploaded, present, skipped or failed."""

    path: str
    key: str
    size: int
    state: str
    error: str
    trash_key: str  # where the object it replaced went ("" if none)


@dataclass(frozen=True)
class StageOutProgress:
    """Counters of one directive and the files decided since the last report."""

    request_id: int
    files: list[FileOutcome]
    files_done: int
    bytes_done: int
    files_total: int
    bytes_total: int
    fetched: int  # files uploaded


@dataclass(frozen=True)
class StageOutResult:
    request_id: int
    files_done: int
    bytes_done: int
    uploaded: int
    written: str = ""  # a packed stage-out: the version it wrote, s3://.../NAME.hpack@N/


@dataclass(frozen=True)
class StageOutReply:
    items: list[StageOutResult]


# -- release, usage, evict, ping --------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseRequest:
    job: str


@dataclass(frozen=True)
class ReleaseReply:
    released: str
    leftover: str  # what the job made undeletable, under the cache's released/ ("" if none)


@dataclass(frozen=True)
class UsageReply:
    """The node cache's own usage and counters (``hpcstage.cache``), shown by the API as
    they are, and its job views."""

    usage: dict[str, Any]
    stats: dict[str, Any]
    views: list[str]
    leftovers: list[str]


@dataclass(frozen=True)
class EvictRequest:
    """The eviction policy (``[cache]``): TTL, then LRU from ``high`` down to ``low``."""

    max_bytes: int
    high: float
    low: float
    ttl: float
    max_objects: int  # 0: bytes only


@dataclass(frozen=True)
class EvictReply:
    evicted: int
    # What the cache holds after the pass (objects and packed trees; one aggregate query):
    # the daemon's per-node cache gauges, a pass old at most.
    bytes: int
    objects: int
    # Store requests retried and lean GETs handed back to the SDK since ``since`` (Unix time
    # the agent started: the daemon tells a new agent's counts from an old one's by it).
    retries: int
    fallbacks: int
    since: float


@dataclass(frozen=True)
class DropSourceRequest:
    """Evict every cached version of ``source``'s objects, whatever the policy; objects a
    job's view links stay (``hpcstage cache evict SRC``). S3 sources only."""

    source: SourceSpec


@dataclass(frozen=True)
class DropSourceReply:
    evicted: int
    evicted_bytes: int
    in_use: int  # kept: a job's view links them
    in_use_bytes: int


@dataclass(frozen=True)
class PingReply:
    node: str
    time: float


# -- peer copy (see hpcstage.staging.peer) ----------------------------------------------------

# What peers copy: S3 objects only (a shared path is as near to every node as a peer's cache).
PEER_KINDS: Final = frozenset({SourceKind.S3_OBJECT, SourceKind.S3_PREFIX})


@dataclass(frozen=True)
class PeerObject:
    """One object a cache holds, as indexed there."""

    cache_id: str
    key: str
    etag: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PeerListRequest:
    source: SourceSpec
    after: str  # the key to list after ("" from the start)
    limit: int


@dataclass(frozen=True)
class PeerListReply:
    objects: list[PeerObject]
    next: str  # "" when this was the last page


@dataclass(frozen=True)
class PeerIds:
    """Cache ids: the request of ``peer_want`` and ``peer_read``."""

    ids: list[str]


@dataclass(frozen=True)
class PeerWantReply:
    want: list[str]


@dataclass(frozen=True)
class PeerBody:
    cache_id: str
    data: str  # base64


@dataclass(frozen=True)
class PeerReadReply:
    objects: list[PeerBody]


@dataclass(frozen=True)
class PeerSent:
    """An object sent to a cache: what the peer indexed, and its bytes (base64). Nothing in
    it is trusted: the receiving agent checks it all (``hpcstage.agent.peer``)."""

    cache_id: str
    key: str
    etag: str
    size: int
    sha256: str
    data: str


@dataclass(frozen=True)
class PeerPutRequest:
    source: SourceSpec
    objects: list[PeerSent]


@dataclass(frozen=True)
class PeerPutReply:
    objects: int
    bytes: int
    refused: int


# Objects above this size go node to node (``peer_serve`` + ``peer_fetch``), never through
# the daemon; up to it, through the daemon's sessions in batches (``peer_read`` + ``peer_put``).
PEER_RELAY_MAX: Final = 1 << 20


@dataclass(frozen=True)
class PeerServeRequest:
    """Open a listener on ``host`` (port chosen by the kernel) that serves each of ``ids``
    once, to a connection that presents ``token``, answering ``proof`` first; it accepts
    connections until ``ttl`` seconds pass with none running. The daemon makes both secrets,
    one pair per copy, and gives them to the holding and the receiving agent only (see
    hpcstage.agent.direct)."""

    ids: list[str]
    host: str
    token: str
    proof: str
    ttl: float


@dataclass(frozen=True)
class PeerServeReply:
    port: int
    objects: list[PeerObject]  # those of ``ids`` this cache holds, as it will serve them


@dataclass(frozen=True)
class PeerFetchRequest:
    """Fetch ``objects`` from the listener at ``host``:``port`` that ``peer_serve`` opened,
    verify every byte and commit the good ones; anything else is a miss for the stage."""

    source: SourceSpec
    host: str
    port: int
    token: str
    proof: str
    objects: list[PeerObject]


# -- the calls --------------------------------------------------------------------------------

HELLO: Final = Rpc("hello", HelloRequest, HelloReply)
CREDENTIALS: Final = Rpc("credentials", CredentialsRequest, CredentialsReply)
STAGE: Final = Rpc("stage", StageRequest, StageReply)
STAGE_OUT: Final = Rpc("stage_out", StageOutRequest, StageOutReply)
RELEASE: Final = Rpc("release", ReleaseRequest, ReleaseReply)
USAGE: Final = Rpc("usage", Empty, UsageReply)
EVICT: Final = Rpc("evict", EvictRequest, EvictReply)
DROP_SOURCE: Final = Rpc("drop_source", DropSourceRequest, DropSourceReply)
PING: Final = Rpc("ping", Empty, PingReply)
PEER_LIST: Final = Rpc("peer_list", PeerListRequest, PeerListReply)
PEER_WANT: Final = Rpc("peer_want", PeerIds, PeerWantReply)
PEER_READ: Final = Rpc("peer_read", PeerIds, PeerReadReply)
PEER_PUT: Final = Rpc("peer_put", PeerPutRequest, PeerPutReply)
RATES: Final = Rpc("rates", RateLimits, Empty)
PEER_SERVE: Final = Rpc("peer_serve", PeerServeRequest, PeerServeReply)
PEER_FETCH: Final = Rpc("peer_fetch", PeerFetchRequest, PeerPutReply)

CALLS: Final[tuple[Rpc[Any, Any], ...]] = (
    HELLO,
    CREDENTIALS,
    STAGE,
    STAGE_OUT,
    RELEASE,
    USAGE,
    EVICT,
    DROP_SOURCE,
    PING,
    PEER_LIST,
    PEER_WANT,
    PEER_READ,
    PEER_PUT,
    RATES,
    PEER_SERVE,
    PEER_FETCH,
)
