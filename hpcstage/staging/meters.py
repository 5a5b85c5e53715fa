"""What the daemon counts as it stages, for /metrics: one ``Meters`` per daemon.

These metrics count *events* (bytes fetched, attempts ended, a job's wait) when they happen,
in the daemon's memory, never in prometheus_client's global registry: the API's collector
(``hpcstage.api.metrics``) reads them at scrape time beside what it reads from the database.
Why memory and not the database: a staging row holds its current attempt only (its counters
start again with each attempt) and rows go when jobs are pruned, so sums over rows go down as
well as up, which Prometheus would read as counter resets and wrong rates. A daemon that
restarts (or an HA peer taking over) starts these at 0, which ``rate()`` and ``increase()``
handle as the reset it is. What is *state* (jobs by Slurm state, stagings by state, leases)
is read from the database at scrape time instead, so it is right on any daemon, at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from hpcstage.protocol.messages import StageProgress

T = TypeVar("T")

# Jobs remembered as observed (or waiting), newest kept: a daemon lives for months of jobs, and
# a job ready again after this many others (moved to another node) is observed again, rarely.
REMEMBERED = 100_000

# Seconds: from a second (a warm cache) to hours (a job array fetching terabytes).
WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, math.inf)


def _counter(name: str, doc: str, *labels: str) -> Counter:
    return Counter(name, doc, labels, registry=None)


@dataclass
class Meters:
    """The daemon's counters and histograms, and the little state the histograms need."""

    fetched_bytes: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_fetched_bytes",
            "Bytes stage-in fetched from the object store into a node's cache.",
            "node",
        )
    )
    fetched_objects: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_fetched_objects",
            "Objects stage-in fetched from the store (packed inputs: ranged GETs).",
            "node",
        )
    )
    uploaded_bytes: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_uploaded_bytes", "Bytes stage-out uploaded to the store.", "node"
        )
    )
    uploaded_objects: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_uploaded_objects", "Files stage-out uploaded to the store.", "node"
        )
    )
    peer_bytes: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_peer_copied_bytes",
            "Bytes copied into a node's cache from another node's cache (peer copy).",
            "node",
        )
    )
    peer_objects: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_peer_copied_objects",
            "Objects copied into a node's cache from another node's cache.",
            "node",
        )
    )
    hits: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_cache_hits",
            "Objects a stage-in found in the node's cache (peer copies included).",
            "node",
        )
    )
    misses: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_cache_misses",
            "Objects a stage-in did not find in the node's cache and fetched from the store.",
            "node",
        )
    )
    retries: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_retries",
            "Store requests a node's agent retried (throttling, 5xx, timeouts, checksum"
            " mismatches), counted with the eviction pass (every 30 s).",
            "node",
        )
    )
    fallbacks: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_store_sdk_fallbacks",
            "GETs a node's agent handed from its lean HTTP path back to the SDK (aiobotocore),"
            " counted with the eviction pass.",
            "node",
        )
    )
    ended: Counter = field(
        default_factory=lambda: _counter(
            "hpcstage_staging_attempts",
            "Staging attempts (one input or output on one node) by how they ended:"
            " ready, failed, or requeued (retried later).",
            "direction",
            "outcome",
        )
    )
    time_to_ready: Histogram = field(
        default_factory=lambda: Histogram(
            "hpcstage_job_time_to_ready_seconds",
            "Seconds from a job's submission (a warmup's creation) to all its inputs ready.",
            ("kind",),
            buckets=WAIT_BUCKETS,
            registry=None,
        )
    )
    data_wait: Histogram = field(
        default_factory=lambda: Histogram(
            "hpcstage_job_data_wait_seconds",
            "Seconds a started job waited for its inputs: from its first `hpcstage env`"
            " request to all its inputs ready (0: ready when it asked).",
            buckets=WAIT_BUCKETS,
            registry=None,
        )
    )
    cache_bytes: Gauge = field(
        default_factory=lambda: Gauge(
            "hpcstage_node_cache_bytes",
            "Bytes in a node's cache, as of the last eviction pass (every 30 s).",
            ("node",),
            registry=None,
        )
    )
    cache_objects: Gauge = field(
        default_factory=lambda: Gauge(
            "hpcstage_node_cache_objects",
            "Objects (and packed trees' inodes) in a node's cache, as of the last eviction pass.",
            ("node",),
            registry=None,
        )
    )
    # job id -> time.monotonic() of its first `hpcstage env` request while not ready
    _asked: dict[int, float] = field(default_factory=dict)
    # Jobs whose wait, and whose time to ready, were observed (dicts: ordered, oldest first).
    _waited: dict[int, None] = field(default_factory=dict)
    _readied: dict[int, None] = field(default_factory=dict)
    # node -> what its agent last reported: (since when, retries, fallbacks)
    _agents: dict[str, tuple[float, int, int]] = field(default_factory=dict)

    def collect(self) -> Iterator[Metric]:
        """Every metric's samples (what the API's collector yields), without the ``_created``
        ones: in the text format Prometheus keeps each as a series of its own (a counter's
        reset shows without it), and prometheus_client's own parser splits a histogram's off
        into a family of its own."""
        for metric in (
            self.fetched_bytes,
            self.fetched_objects,
            self.uploaded_bytes,
            self.uploaded_objects,
            self.peer_bytes,
            self.peer_objects,
            self.hits,
            self.misses,
            self.retries,
            self.fallbacks,
            self.ended,
            self.time_to_ready,
            self.data_wait,
            self.cache_bytes,
            self.cache_objects,
        ):
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                yield family

    def attempt_ended(self, direction: str, outcome: str, count: int = 1) -> None:
        """``count`` staging attempts ended: ``outcome`` is ready, failed, dropped or requeued."""
        if count:
            self.ended.labels("out" if direction == "out" else "in", outcome).inc(count)

    def uploaded(self, node: str, size: int) -> None:
        """Stage-out uploaded one file of ``size`` bytes from ``node``."""
        self.uploaded_objects.labels(node).inc()
        self.uploaded_bytes.labels(node).inc(size)

    def peer_copied(self, node: str, objects: int, size: int) -> None:
        """``objects`` objects (``size`` bytes) were copied into ``node``'s cache from a peer."""
        self.peer_objects.labels(node).inc(objects)
        self.peer_bytes.labels(node).inc(size)

    def cache_held(self, node: str, size: int, objects: int) -> None:
        """What ``node``'s cache held after an eviction pass."""
        self.cache_bytes.labels(node).set(size)
        self.cache_objects.labels(node).set(objects)

    def agent_reported(self, node: str, since: float, retries: int, fallbacks: int) -> None:
        """``node``'s agent has retried ``retries`` requests and handed ``fallbacks`` GETs to
        the SDK since ``since`` (when it started); counted are those since its last report,
        or all of them from a new agent."""
        last_since, last_retries, last_fallbacks = self._agents.get(node, (since, 0, 0))
        if last_since != since:
            last_retries, last_fallbacks = 0, 0
        self.retries.labels(node).inc(max(0, retries - last_retries))
        self.fallbacks.labels(node).inc(max(0, fallbacks - last_fallbacks))
        self._agents[node] = (since, retries, fallbacks)

    def job_asked(self, job_id: int, ready: bool) -> None:
        """A running job asked for its inputs (``hpcstage env``'s request): its wait starts
        now, or is 0 if they are ``ready`` where it runs. Only its first request counts."""
        if job_id in self._waited or job_id in self._asked:
            return
        if ready:
            _remember(self._waited, job_id, None)
            self.data_wait.observe(0)
        else:
            _remember(self._asked, job_id, time.monotonic())

    def job_ready(self, job_id: int, kind: str, since: float) -> None:
        """All the job's inputs are ready (``since``: its submission, Unix time); observed
        once per job in this daemon's life."""
        if job_id not in self._readied:
            _remember(self._readied, job_id, None)
            self.time_to_ready.labels(kind).observe(max(0.0, time.time() - since))

    def waiting(self) -> list[int]:
        """Jobs that asked for their inputs and wait for them still."""
        return list(self._asked)

    def wait_over(self, job_id: int) -> None:
        """The inputs of a job are ready where it runs: the wait of a job that asked ends."""
        asked = self._asked.pop(job_id, None)
        if asked is not None:
            _remember(self._waited, job_id, None)
            self.data_wait.observe(time.monotonic() - asked)

    def job_failed(self, job_id: int) -> None:
        """The job's staging failed: it waits no more (``hpcstage env`` fails it)."""
        self._asked.pop(job_id, None)


def _remember(jobs: dict[int, T], job_id: int, value: T) -> None:
    """Keep ``job_id`` in ``jobs``, forgetting the oldest beyond ``REMEMBERED``."""
    jobs[job_id] = value
    while len(jobs) > REMEMBERED:
        del jobs[next(iter(jobs))]


@dataclass
class StageCounts:
    """Turns one stage-in attempt's progress reports (cumulative) into counter increments,
    as they arrive: bytes a failed attempt fetched count too."""

    meters: Meters
    node: str
    hits_known: bool  # False for packed inputs: their "fetched" are ranged GETs, not objects
    _fetched: int = 0
    _bytes: int = 0
    _hits: int = 0

    def seen(self, data: StageProgress) -> None:
        """Count what ``data`` reports beyond the last report."""
        if data.fetched > self._fetched:
            self.meters.fetched_objects.labels(self.node).inc(data.fetched - self._fetched)
            if self.hits_known:
                self.meters.misses.labels(self.node).inc(data.fetched - self._fetched)
            self._fetched = data.fetched
        if data.fetched_bytes > self._bytes:
            self.meters.fetched_bytes.labels(self.node).inc(data.fetched_bytes - self._bytes)
            self._bytes = data.fetched_bytes
        # A miss is counted when its fetch starts, and done when it ends: done - fetched
        # never overtakes the final number of hits, so counting its maximum is exact.
        hits = data.files_done - data.fetched
        if self.hits_known and hits > self._hits:
            self.meters.hits.labels(self.node).inc(hits - self._hits)
            self._hits = hits
