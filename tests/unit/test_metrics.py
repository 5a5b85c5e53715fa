"""/metrics' collector over an in-memory state database and the daemon's meters: the whole
exposition parsed back with prometheus_client's own parser, and the job wait's rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from hpcstage import __version__
from hpcstage.api.collector import registry_for
from hpcstage.config.load import parse_config
from hpcstage.db import Job, Request, Staging, open_db
from hpcstage.protocol.messages import StageProgress
from hpcstage.service.daemon import Daemon as SiteDaemon
from hpcstage.staging import meters as meters_module
from hpcstage.staging.meters import Meters, StageCounts

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Daemon:
    """What the collector reads of the daemon (a part of api.service.StagingService)."""

    db: sessionmaker[Session] | None
    meters: Meters = field(default_factory=Meters)
    last_tick: float = 1700000000.5


@pytest.fixture
def db() -> Iterator[sessionmaker[Session]]:
    found = open_db("sqlite://")
    yield found
    found.kw["bind"].dispose()


def scrape(daemon: Daemon) -> tuple[dict[str, str], Samples]:
    """Each metric family's type, and every sample by name and labels."""
    text = generate_latest(registry_for(daemon)).decode()
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return types, samples


def _job(session: Session, slurm_id: int, state: str, *stagings: tuple[str, str, int]) -> None:
    """A job with one stage-in per (node, staging state, bytes) in ``stagings``."""
    job = Job(slurm_job_id=slurm_id, user="bob", state=state, first_seen=1.0)
    request = Request(direction="in", src="s3://d/x/", dest="x")
    job.requests.append(request)
    for node, st, size in stagings:
        request.stagings.append(Staging(node=node, state=st, bytes_done=size))
    session.add(job)


def test_the_state_is_read_at_scrape_time_and_parses(db: sessionmaker[Session]) -> None:
    with db.begin() as session:
        _job(session, 1, "RUNNING", ("n1", "ready", 100), ("n2", "ready", 100))
        _job(session, 2, "RUNNING", ("n1", "ready", 50))
        _job(session, 3, "PENDING", ("n1", "running", 7))
        old = Job(slurm_job_id=4, user="bob", state="COMPLETED", released_at=2.0)
        session.add(old)
    daemon = Daemon(db)
    types, samples = scrape(daemon)
    assert samples["hpcstage_build_info", (("version", __version__),)] == 1
    assert samples["hpcstage_last_tick_timestamp_seconds", ()] == 1700000000.5
    assert samples["hpcstage_jobs", (("state", "RUNNING"),)] == 2
    assert samples["hpcstage_jobs", (("state", "PENDING"),)] == 1
    assert ("hpcstage_jobs", (("state", "COMPLETED"),)) not in samples  # released
    assert samples["hpcstage_stagings", (("direction", "in"), ("state", "ready"))] == 3
    assert samples["hpcstage_node_leases", (("node", "n1"),)] == 2
    assert samples["hpcstage_node_leases", (("node", "n2"),)] == 1
    assert samples["hpcstage_node_leased_bytes", (("node", "n1"),)] == 150
    assert types["hpcstage_store_fetched_bytes"] == "counter"
    assert types["hpcstage_job_data_wait_seconds"] == "histogram"
    # A state that changes is seen by the next scrape: nothing is cached in between.
    with db.begin() as session:
        session.query(Job).filter(Job.slurm_job_id == 2).one().released_at = 3.0
    assert scrape(daemon)[1]["hpcstage_node_leases", (("node", "n1"),)] == 1


def test_kept_warm_bytes_are_counted_per_node_apart_from_jobs_leases(
    db: sessionmaker[Session],
) -> None:
    with db.begin() as session:
        _job(session, 1, "RUNNING", ("n1", "ready", 100))
        pin = Job(kind="pin", user="root", state="PINNED", planned_nodes="n1,n2")
        request = Request(direction="in", src="s3://d/kept/", dest="kept")
        request.stagings += [
            Staging(node="n1", state="ready", bytes_done=4000),
            Staging(node="n2", state="running", bytes_done=300),  # a refresh: still leased
        ]
        pin.requests.append(request)
        session.add(pin)
    samples = scrape(Daemon(db))[1]
    assert samples["hpcstage_node_pinned_bytes", (("node", "n1"),)] == 4000
    assert samples["hpcstage_node_pinned_bytes", (("node", "n2"),)] == 300
    assert samples["hpcstage_node_leased_bytes", (("node", "n1"),)] == 100  # jobs' only
    assert samples["hpcstage_jobs", (("state", "PINNED"),)] == 1


def test_two_registries_never_share_a_metric(db: sessionmaker[Session]) -> None:
    one, two = Daemon(db), Daemon(db)
    one.meters.uploaded("n1", 10)
    key = ("hpcstage_store_uploaded_bytes_total", (("node", "n1"),))
    assert scrape(one)[1][key] == 10
    assert key not in scrape(two)[1]


def test_stage_counts_turn_cumulative_reports_into_exact_increments() -> None:
    meters = Meters()
    counts = StageCounts(meters, "n1", hits_known=True)
    # (files_done, fetched: counted when its fetch starts, fetched_bytes), cumulative
    for done, fetched, size in [(1, 0, 0), (2, 1, 0), (4, 2, 10), (6, 3, 30), (6, 3, 30)]:
        counts.seen(StageProgress(1, done, 0, None, None, fetched, size))
    again = StageCounts(meters, "n1", hits_known=True)  # the next attempt counts from 0
    again.seen(StageProgress(1, 1, 0, None, None, 1, 5))
    _, samples = scrape(Daemon(None, meters))
    node = (("node", "n1"),)
    assert samples["hpcstage_store_fetched_objects_total", node] == 4
    assert samples["hpcstage_store_fetched_bytes_total", node] == 35
    assert samples["hpcstage_cache_misses_total", node] == 4
    assert samples["hpcstage_cache_hits_total", node] == 3


def test_a_packed_input_counts_its_gets_but_no_hits_or_misses() -> None:
    meters = Meters()
    StageCounts(meters, "n1", hits_known=False).seen(StageProgress(1, 900, 0, 900, 0, 3, 4096))
    _, samples = scrape(Daemon(None, meters))
    assert samples["hpcstage_store_fetched_objects_total", (("node", "n1"),)] == 3
    assert ("hpcstage_cache_hits_total", (("node", "n1"),)) not in samples


def test_a_jobs_wait_counts_from_its_first_request_once() -> None:
    meters = Meters()
    meters.job_asked(1, ready=False)
    meters.job_asked(1, ready=False)  # hpcstage env asks again every few seconds
    assert meters.waiting() == [1]
    meters.wait_over(1)
    meters.wait_over(1)  # another input, another tick: observed once
    meters.job_asked(2, ready=True)  # its data was there when it started
    meters.job_asked(2, ready=True)
    meters.job_asked(3, ready=False)
    meters.job_failed(3)  # never ready: no wait observed
    meters.wait_over(3)
    assert meters.waiting() == []
    meters.job_ready(1, "job", since=0.0)
    meters.job_ready(1, "job", since=0.0)  # another node's staging: observed once
    meters.job_ready(3, "warmup", since=0.0)
    _, samples = scrape(Daemon(None, meters))
    assert samples["hpcstage_job_data_wait_seconds_count", ()] == 2
    assert samples["hpcstage_job_data_wait_seconds_bucket", (("le", "0.5"),)] == 2
    assert samples["hpcstage_job_time_to_ready_seconds_count", (("kind", "job"),)] == 1
    assert samples["hpcstage_job_time_to_ready_seconds_count", (("kind", "warmup"),)] == 1
    # since=0.0: ready decades after its "submission"
    ready_fast = ("hpcstage_job_time_to_ready_seconds_bucket", (("kind", "job"), ("le", "0.5")))
    assert samples[ready_fast] == 0


def test_the_docs_and_the_dashboard_name_exactly_the_metrics_served(
    db: sessionmaker[Session],
) -> None:
    types, _ = scrape(Daemon(db))
    # How each type's samples are named, and how docs/metrics.md's table names the metric.
    samples = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    shown = {"counter": "_total", "info": "_info"}
    served = {name + s for name, kind in types.items() for s in samples.get(kind, ("",))}
    root = Path(__file__).parents[2]
    table = (root / "docs" / "metrics.md").read_text().split("## The metrics")[1]
    documented = set(re.findall(r"^\| `(hpcstage_\w+)`", table, re.MULTILINE))
    assert documented == {name + shown.get(kind, "") for name, kind in types.items()}
    dashboard = (root / "examples" / "grafana-dashboard.json").read_text()
    json.loads(dashboard)  # Grafana imports JSON
    used = set(re.findall(r"hpcstage_\w+", dashboard))
    assert used <= served, used - served
    assert len(used) > 10


def test_a_long_lived_daemon_remembers_a_bounded_number_of_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(meters_module, "REMEMBERED", 3)
    meters = Meters()
    for job in range(10):
        meters.job_asked(job, ready=False)  # cancelled while waiting: never ready
        meters.job_ready(100 + job, "job", since=0.0)
    assert list(meters._asked) == [7, 8, 9]
    assert list(meters._readied) == [107, 108, 109]
    meters.job_ready(109, "job", since=0.0)  # still remembered: not observed twice
    _, samples = scrape(Daemon(None, meters))
    assert samples["hpcstage_job_time_to_ready_seconds_count", (("kind", "job"),)] == 10


def test_agents_retries_and_fallbacks_are_counted_once_also_across_a_new_agent() -> None:
    meters = Meters()
    meters.agent_reported("n1", since=100.0, retries=2, fallbacks=1)
    meters.agent_reported("n1", since=100.0, retries=5, fallbacks=1)  # 3 more retries
    meters.agent_reported("n1", since=200.0, retries=1, fallbacks=4)  # a new agent: all new
    meters.agent_reported("n2", since=100.0, retries=0, fallbacks=0)
    _, samples = scrape(Daemon(None, meters))
    assert samples["hpcstage_store_retries_total", (("node", "n1"),)] == 2 + 3 + 1
    assert samples["hpcstage_store_sdk_fallbacks_total", (("node", "n1"),)] == 1 + 4
    assert samples["hpcstage_store_retries_total", (("node", "n2"),)] == 0


def test_the_daemon_times_a_wait_from_the_ask_to_ready_where_the_job_runs(tmp_path: Path) -> None:
    settings = parse_config(
        f'[site]\nname = "t"\nstate_dir = "{tmp_path}"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
    )
    db = open_db(f"sqlite:///{tmp_path / 'state.db'}")
    daemon = SiteDaemon(settings, db=db)
    with db.begin() as session:
        _job(session, 1, "RUNNING", ("n1", "ready", 10))  # staged ahead on the node it got
        _job(session, 2, "RUNNING", ("n1", "ready", 10))
        first, second = (j.id for j in session.query(Job).order_by(Job.id))
        session.get_one(Job, first).nodes = "n1"
    daemon.job_asked(first)  # ready where it runs: waited 0 s
    daemon.job_asked(second)  # asked before the daemon saw where it runs
    assert daemon.meters.waiting() == [second]
    with db.begin() as session:
        session.get_one(Job, second).nodes = "n1"  # the next snapshot shows it on n1
    with db.begin() as session:
        daemon._end_waits(session)  # what each tick does
    assert daemon.meters.waiting() == []
    _, samples = scrape(Daemon(None, daemon.meters))
    assert samples["hpcstage_job_data_wait_seconds_count", ()] == 2
    db.kw["bind"].dispose()
