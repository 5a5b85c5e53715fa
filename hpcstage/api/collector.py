"""What /metrics exposes, gathered at scrape time into the app's own CollectorRegistry.

Two sources (docs/metrics.md lists every metric):

- the daemon's :class:`~hpcstage.staging.meters.Meters`: counters and histograms of events
  (bytes fetched, attempts ended, waits), kept in memory because the database keeps no
  history of them; they restart at 0 with the daemon (a counter reset, as Prometheus expects);
- the state database, read here with a few GROUP BY queries: what *is* (jobs by Slurm state,
  stagings by state, job views leasing cache on each node). Read at each scrape, these are
  right on a daemon that just started or took over from its HA peer.

The registry is made per app (never prometheus_client's global one), so two apps in one
process (tests) never share a metric.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from hpcstage import __version__
from hpcstage.api.service import StagingService
from hpcstage.db import Job, Request, Staging


def registry_for(service: StagingService) -> CollectorRegistry:
    """A registry of its own for one app, collecting from ``service`` at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(service))
    return registry


class DaemonCollector(Collector):
    """The daemon's meters, its state database and its build, read when scraped."""

    def __init__(self, service: StagingService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("hpcstage_build", "The daemon's version.", {"version": __version__})
        last = GaugeMetricFamily(
            "hpcstage_last_tick_timestamp_seconds",
            "Unix time of the daemon's last queue snapshot and plan (0 before the first).",
        )
        last.add_metric([], self.service.last_tick)
        yield last
        yield from self.service.meters.collect()
        if self.service.db is not None:
            with self.service.db.begin() as session:
                yield from state_metrics(session)


def state_metrics(session: Session) -> Iterator[Metric]:
    """Gauges of what the state database holds now (each one aggregate query)."""
    jobs = GaugeMetricFamily(
        "hpcstage_jobs",
        "Jobs (and warmups) with directives not yet released, by Slurm state: the queue.",
        labels=["state"],
    )
    open_jobs = select(Job.state, func.count()).where(Job.released_at.is_(None))
    for state, count in session.execute(open_jobs.group_by(Job.state)):
        jobs.add_metric([state], count)
    yield jobs
    stagings = GaugeMetricFamily(
        "hpcstage_stagings",
        "Stagings (one input or output of a job on one node) of unreleased jobs, by state.",
        labels=["direction", "state"],
    )
    by_state = (
        select(Request.direction, Staging.state, func.count())
        .join(Request, Staging.request_id == Request.id)
        .join(Job, Request.job_id == Job.id)
        .where(Job.released_at.is_(None))
        .group_by(Request.direction, Staging.state)
    )
    for direction, state, count in session.execute(by_state):
        stagings.add_metric(["out" if direction == "out" else "in", state], count)
    yield stagings
    yield from _leases(session)


def _leases(session: Session) -> Iterator[Metric]:
    """Job views on each node: a ready stage-in of a job not yet released holds its objects."""
    leases = GaugeMetricFamily(
        "hpcstage_node_leases",
        "Jobs whose view on the node leases cached objects (ready inputs, not released).",
        labels=["node"],
    )
    leased = GaugeMetricFamily(
        "hpcstage_node_leased_bytes",
        "Bytes of the node's cache that job views lease (ready inputs, not released).",
        labels=["node"],
    )
    held = (
        select(Staging.node, func.count(distinct(Request.job_id)), func.sum(Staging.bytes_done))
        .join(Request, Staging.request_id == Request.id)
        .join(Job, Request.job_id == Job.id)
        .where(
            Job.released_at.is_(None),
            Job.kind == "job",  # a warmup leases nothing; a pin: hpcstage_node_pinned_bytes
            Request.direction == "in",
            Staging.state == "ready",
        )
        .group_by(Staging.node)
    )
    for node, jobs, size in session.execute(held):
        leases.add_metric([node], jobs)
        leased.add_metric([node], size or 0)
    yield leases
    yield leased
    yield _pinned(session)


def _pinned(session: Session) -> Metric:
    """Bytes kept warm on each node (``hpcstage pin``): leased by the pins' own views."""
    pinned = GaugeMetricFamily(
        "hpcstage_node_pinned_bytes",
        "Bytes of the node's cache that kept-warm datasets (hpcstage pin) lease.",
        labels=["node"],
    )
    kept = (
        select(Staging.node, func.sum(Staging.bytes_done))
        .join(Request, Staging.request_id == Request.id)
        .join(Job, Request.job_id == Job.id)
        .where(
            Job.released_at.is_(None),
            Job.kind == "pin",
            Request.direction == "in",
            Staging.state.in_(("ready", "running", "queued")),  # a refresh keeps the lease
        )
        .group_by(Staging.node)
    )
    for node, size in session.execute(kept):
        pinned.add_metric([node], size or 0)
    return pinned
