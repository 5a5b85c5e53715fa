"""The planner's rules, one table row at a time (pure: no Slurm, no agents)."""

from __future__ import annotations

from hpcstage.core.plan import JobView, MarkReleased, Release, Restage, Stage, node_state, plan

NOW = 1_000_000.0
GRACE = 60.0


def job(**kw: object) -> JobView:
    base: dict[str, object] = {"id": 1, "kind": "job", "state": "PENDING"}
    base.update(kw)
    return JobView(**base)  # type: ignore[arg-type]


def stages(actions: list[object]) -> list[tuple[int, str]]:
    return [(a.job_id, a.node) for a in actions if isinstance(a, Stage)]


def releases(actions: list[object]) -> list[tuple[int, str]]:
    return [(a.job_id, a.node) for a in actions if isinstance(a, Release)]


def restages(actions: list[object]) -> list[tuple[int, str]]:
    return [(a.job_id, a.node) for a in actions if isinstance(a, Restage)]


def test_pending_job_is_staged_on_its_planned_nodes() -> None:
    actions = plan([job(planned_nodes=("n2", "n3"))], NOW, GRACE, {})
    assert stages(actions) == [(1, "n2"), (1, "n3")]


def test_pending_job_without_a_plan_waits() -> None:
    assert plan([job()], NOW, GRACE, {}) == []


def test_running_job_is_staged_where_it_runs_not_where_it_was_planned() -> None:
    view = job(state="RUNNING", nodes=("n1",), planned_nodes=("n2",), node_states={"n2": "ready"})
    assert stages(plan([view], NOW, GRACE, {})) == [(1, "n1")]


def test_nodes_already_ready_or_in_flight_are_not_staged_again() -> None:
    view = job(
        planned_nodes=("n1", "n2", "n3"),
        node_states={"n1": "ready", "n2": "running", "n3": "queued"},
    )
    assert stages(plan([view], NOW, GRACE, {})) == [(1, "n3")]


def test_moved_plan_releases_the_old_nodes_views() -> None:
    view = job(planned_nodes=("n3",), node_states={"n1": "ready", "n2": "running"})
    actions = plan([view], NOW, GRACE, {})
    assert stages(actions) == [(1, "n3")]
    assert releases(actions) == [(1, "n1")]  # n2 is still transferring: released later


def test_refused_or_failed_jobs_get_nothing_more() -> None:
    refused = job(id=1, planned_nodes=("n1",), error="line 3: bad")
    failed = job(id=2, planned_nodes=("n2",), node_states={"n1": "failed"})
    assert stages(plan([refused, failed], NOW, GRACE, {})) == []


def test_a_dropped_node_is_not_staged_again_while_the_others_are() -> None:
    view = job(planned_nodes=("n1", "n2", "n3"), node_states={"n2": "dropped"})
    assert stages(plan([view], NOW, GRACE, {})) == [(1, "n1"), (1, "n3")]


def test_a_dropped_node_gets_one_more_attempt_once_the_job_runs_there() -> None:
    view = job(state="RUNNING", nodes=("n2",), node_states={"n2": "dropped", "n1": "ready"})
    actions = plan([view], NOW, GRACE, {})
    assert stages(actions) == [(1, "n2")]
    assert releases(actions) == [(1, "n1")]  # the plan moved: its view goes


def test_when_the_plan_leaves_a_dropped_node_its_partial_view_is_released() -> None:
    view = job(planned_nodes=("n3",), node_states={"n2": "dropped"})
    actions = plan([view], NOW, GRACE, {})
    assert (stages(actions), releases(actions)) == ([(1, "n3")], [(1, "n2")])


def test_running_jobs_first_then_earliest_start_then_priority() -> None:
    jobs = [
        job(id=1, planned_nodes=("n1",), expected_start=NOW + 300, priority=10),
        job(id=2, planned_nodes=("n1",), expected_start=NOW + 100, priority=1),
        job(id=3, state="RUNNING", nodes=("n1",)),
        job(id=4, planned_nodes=("n1",), expected_start=NOW + 100, priority=5),
    ]
    assert [j for j, _ in stages(plan(jobs, NOW, GRACE, {}, max_per_node=10))] == [3, 4, 2, 1]


def test_at_most_max_per_node_stage_operations() -> None:
    jobs = [job(id=i, planned_nodes=("n1",), expected_start=NOW + i) for i in range(1, 6)]
    assert stages(plan(jobs, NOW, GRACE, {"n1": 2}, max_per_node=3)) == [(1, "n1")]


def test_ended_job_keeps_its_lease_for_the_grace_period() -> None:
    view = job(state="COMPLETED", ended_at=NOW - 10, node_states={"n1": "ready"})
    assert plan([view], NOW, GRACE, {}) == []
    later = plan([view], NOW + GRACE, GRACE, {})
    assert releases(later) == [(1, "n1")]
    assert MarkReleased(1) not in later  # only once the release really happened
    gone = job(state="COMPLETED", ended_at=NOW - 10, node_states={"n1": "released"})
    assert plan([gone], NOW + GRACE, GRACE, {}) == [MarkReleased(1)]


def test_ended_job_waits_for_transfers_in_flight() -> None:
    view = job(state="CANCELLED", ended_at=NOW - 1000, node_states={"n1": "running"})
    assert plan([view], NOW, GRACE, {}) == []


def test_warmup_is_staged_then_released_at_once() -> None:
    warm = job(kind="warmup", state="WARMUP", planned_nodes=("n1", "n2"))
    assert stages(plan([warm], NOW, GRACE, {})) == [(1, "n1"), (1, "n2")]
    done = job(
        kind="warmup",
        state="WARMUP",
        planned_nodes=("n1", "n2"),
        node_states={"n1": "ready", "n2": "ready"},
    )
    actions = plan([done], NOW, GRACE, {})
    assert releases(actions) == [(1, "n1"), (1, "n2")]
    released = job(
        kind="warmup",
        state="WARMUP",
        planned_nodes=("n1", "n2"),
        node_states={"n1": "released", "n2": "released"},
    )
    assert plan([released], NOW, GRACE, {}) == [MarkReleased(1)]  # and never staged again


def test_a_kept_warm_dataset_keeps_its_lease_until_removed_then_goes_at_once() -> None:
    pinned = job(kind="pin", state="PINNED", planned_nodes=("n1", "n2"), inputs=DS)
    staged = plan([pinned], NOW, GRACE, {}, cache_nodes=CACHE)  # on its nodes, never a cache's
    assert [(a.node, a.reason) for a in staged if isinstance(a, Stage)] == [
        ("n1", "kept warm"),
        ("n2", "kept warm"),
    ]
    assert len(staged) == 2
    warm = job(
        kind="pin",
        state="PINNED",
        planned_nodes=("n1", "n2"),
        node_states={"n1": "ready", "n2": "ready"},
    )
    assert plan([warm], NOW, GRACE, {}) == []  # held: no release, as a warmup would get
    refreshed = job(
        kind="pin",
        state="PINNED",
        planned_nodes=("n1", "n2"),
        node_states={"n1": "queued", "n2": "ready"},  # a scheduled refresh queued it again
    )
    assert stages(plan([refreshed], NOW, GRACE, {})) == [(1, "n1")]
    removed = job(
        kind="pin",
        state="UNPINNED",
        planned_nodes=("n1", "n2"),
        node_states={"n1": "ready", "n2": "ready"},
        ended_at=NOW - 1,  # no lease grace: nothing will run in its view
    )
    actions = plan([removed], NOW, GRACE, {})
    assert releases(actions) == [(1, "n1"), (1, "n2")]
    assert {a.reason for a in actions if isinstance(a, Release)} == {"no longer kept warm"}


def test_node_state_aggregation() -> None:
    assert node_state(["ready", "ready"]) == "ready"
    assert node_state(["ready", "running"]) == "running"
    assert node_state(["queued", "ready"]) == "queued"
    assert node_state(["ready", "failed", "running"]) == "failed"
    assert node_state(["ready", "dropped"]) == "dropped"
    assert node_state(["dropped", "running"]) == "running"
    assert node_state([]) == "absent"


def test_ended_job_stages_out_first_and_releases_only_after() -> None:
    ended = {"state": "COMPLETED", "ended_at": NOW - 1000, "node_states": {"n1": "ready"}}
    actions = plan([job(**ended, out_state="pending", out_node="n1")], NOW, GRACE, {})
    assert [(type(a).__name__, a.node) for a in actions] == [("StageOut", "n1")]
    assert plan([job(**ended, out_state="running", out_node="n1")], NOW, GRACE, {}) == []
    done = plan([job(**ended, out_state="done", out_node="n1")], NOW, GRACE, {})
    assert releases(done) == [(1, "n1")]
    # A failed stage-out keeps the outputs (and the lease): never lose data.
    assert plan([job(**ended, out_state="failed", out_node="n1")], NOW, GRACE, {}) == []


def test_outputs_naming_the_node_are_staged_out_from_every_node_of_the_job() -> None:
    ended = {"state": "COMPLETED", "ended_at": NOW - 1000, "out_node": "n1"}
    view = job(**ended, out_state="pending", out_nodes=("n1", "n2", "n3"))
    actions = plan([view], NOW, GRACE, {})
    assert [(type(a).__name__, a.node) for a in actions] == [
        ("StageOut", "n1"),
        ("StageOut", "n2"),
        ("StageOut", "n3"),
    ]


# -- the cache cluster -------------------------------------------------------------------------

CACHE = ("c1", "c2", "c3")
DS = "s3://datasets/ligands/"


def test_a_job_without_a_plan_goes_to_one_cache_node_chosen_by_its_inputs() -> None:
    actions = plan([job(inputs=DS)], NOW, GRACE, {}, cache_nodes=CACHE)
    [(job_id, node)] = stages(actions)
    assert job_id == 1 and node in CACHE
    reason = next(a.reason for a in actions if isinstance(a, Stage))
    assert "cache cluster" in reason
    # Every job needing the same dataset is held on the same node; datasets spread out.
    same = plan([job(id=7, inputs=DS, priority=5)], NOW, GRACE, {}, cache_nodes=CACHE)
    assert stages(same) == [(7, node)]
    spread = {
        stages(plan([job(inputs=f"s3://d/{i}/")], NOW, GRACE, {}, cache_nodes=CACHE))[0][1]
        for i in range(30)
    }
    assert spread == set(CACHE)


def test_no_cache_cluster_or_no_inputs_means_waiting_as_before() -> None:
    assert plan([job(inputs=DS)], NOW, GRACE, {}) == []
    assert plan([job()], NOW, GRACE, {}, cache_nodes=CACHE) == []


def test_once_planned_the_job_moves_to_its_nodes_and_the_cache_node_lets_go() -> None:
    held = stages(plan([job(inputs=DS)], NOW, GRACE, {}, cache_nodes=CACHE))[0][1]
    view = job(inputs=DS, planned_nodes=("n1",), node_states={held: "ready"})
    actions = plan([view], NOW, GRACE, {}, cache_nodes=CACHE)
    assert stages(actions) == [(1, "n1")]
    assert releases(actions) == [(1, held)]
    why = next(a.reason for a in actions if isinstance(a, Release))
    assert "cache cluster" in why
    running = job(inputs=DS, state="RUNNING", nodes=("n2",), node_states={held: "ready"})
    actions = plan([running], NOW, GRACE, {}, cache_nodes=CACHE)
    assert (stages(actions), releases(actions)) == ([(1, "n2")], [(1, held)])


def test_a_job_that_lost_its_plan_keeps_its_views_and_is_not_copied_to_the_cache() -> None:
    view = job(inputs=DS, node_states={"n1": "ready"})
    assert plan([view], NOW, GRACE, {}, cache_nodes=CACHE) == []


def test_warmups_and_running_jobs_never_go_to_the_cache_cluster() -> None:
    warm = job(kind="warmup", state="WARMUP", inputs=DS, planned_nodes=("n1",))
    assert stages(plan([warm], NOW, GRACE, {}, cache_nodes=CACHE)) == [(1, "n1")]
    running = job(inputs=DS, state="RUNNING")  # no nodes known yet: nothing to do
    assert plan([running], NOW, GRACE, {}, cache_nodes=CACHE) == []


# --- Slurm power saving: nodes powered down or booting have no agent -----------------------


def test_a_job_on_a_powered_down_node_is_held_on_the_cache_cluster_meanwhile() -> None:
    # Slurm allocated c1 and runs ResumeProgram: the job is CONFIGURING, c1 is booting.
    view = job(state="CONFIGURING", nodes=("c1",), inputs="s3://b/ds/")
    actions = plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake={"n1", "n2"})
    assert stages(actions) == [(1, "cache1")]
    (stage,) = [a for a in actions if isinstance(a, Stage)]
    assert "c1 powered down or booting" in stage.reason


def test_the_node_is_staged_once_up_and_the_cache_node_lets_go() -> None:
    view = job(state="RUNNING", nodes=("c1",), inputs="s3://b/ds/", node_states={"cache1": "ready"})
    actions = plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake={"c1"})
    assert stages(actions) == [(1, "c1")]
    assert releases(actions) == [(1, "cache1")]


def test_a_sleeping_node_is_never_staged_failed_or_dropped_without_a_cache_cluster() -> None:
    view = job(planned_nodes=("c1",), inputs="s3://b/ds/", node_states={"c1": "queued"})
    actions = plan([view], NOW, GRACE, {}, awake={"n1"})
    assert actions == []  # waits: nothing to stage onto, nothing released


def test_a_running_peer_that_holds_the_inputs_keeps_them_while_the_node_sleeps() -> None:
    # Planned on n1 (staged there), then Slurm moved the plan to a powered-down node.
    view = job(planned_nodes=("c1",), inputs="s3://b/ds/", node_states={"n1": "ready"})
    actions = plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake={"n1"})
    assert stages(actions) == [] and releases(actions) == []


def test_of_a_multi_node_job_the_awake_nodes_are_staged_the_sleeping_ones_later() -> None:
    view = job(state="CONFIGURING", nodes=("n1", "c1"), inputs="s3://b/ds/")
    actions = plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake={"n1"})
    assert stages(actions) == [(1, "n1")]


def test_a_view_on_a_node_gone_to_sleep_is_kept() -> None:
    view = job(planned_nodes=("c1",), node_states={"c1": "ready"}, inputs="s3://b/ds/")
    assert releases(plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake=set())) == []


def test_without_power_saving_every_node_counts_as_up() -> None:
    view = job(state="CONFIGURING", nodes=("c1",), inputs="s3://b/ds/")
    assert stages(plan([view], NOW, GRACE, {}, cache_nodes=["cache1"])) == [(1, "c1")]


def test_a_view_on_a_node_that_powered_down_since_is_staged_again_once_it_is_up() -> None:
    # The job's inputs were ready on c1; c1 idled past SuspendTime and powered off (a cloud
    # node's disk is new at each boot): its view is built again when Slurm resumes it.
    ready = {"c1": "ready"}
    view = job(planned_nodes=("c1",), node_states=ready, inputs="s3://b/ds/")
    actions = plan([view], NOW, GRACE, {}, cache_nodes=["cache1"], awake=set())
    assert restages(actions) == [(1, "c1")]
    assert stages(actions) == [(1, "cache1")]  # held on the cache cluster meanwhile
    assert "c1 powered down" in next(a.reason for a in actions if isinstance(a, Restage))
    # The executor marks c1 queued: nothing goes to c1 while it sleeps, all of it once up.
    queued = job(planned_nodes=("c1",), node_states={"c1": "queued"}, inputs="s3://b/ds/")
    assert plan([queued], NOW, GRACE, {}, awake=set()) == []
    assert stages(plan([queued], NOW, GRACE, {}, awake={"c1"})) == [(1, "c1")]
    # A kept-warm dataset's view too; a node that is up, or a warmup (no view), keeps its own.
    pin = job(kind="pin", state="PINNED", planned_nodes=("c1",), node_states=ready)
    assert restages(plan([pin], NOW, GRACE, {}, awake=set())) == [(1, "c1")]
    assert restages(plan([view, pin], NOW, GRACE, {}, awake={"c1"})) == []
    warm = job(kind="warmup", state="WARMUP", planned_nodes=("c1", "n1"), node_states=ready)
    assert restages(plan([warm], NOW, GRACE, {}, awake={"n1"})) == []
    assert restages(plan([view], NOW, GRACE, {})) == []  # without power saving: never


def test_a_warmup_or_pin_waits_for_its_sleeping_nodes_without_reaching_them() -> None:
    # No attempt (no connection) while c1 sleeps; the warmup is not done until c1 is staged.
    warm = job(kind="warmup", state="WARMUP", planned_nodes=("n1", "c1"), inputs="s3://b/ds/")
    assert stages(plan([warm], NOW, GRACE, {}, cache_nodes=["cache1"], awake={"n1"})) == [(1, "n1")]
    half = job(
        kind="warmup", state="WARMUP", planned_nodes=("n1", "c1"), node_states={"n1": "ready"}
    )
    assert plan([half], NOW, GRACE, {}, awake={"n1"}) == []  # held, not released nor staged
    assert stages(plan([half], NOW, GRACE, {}, awake={"n1", "c1"})) == [(1, "c1")]
    pin = job(kind="pin", state="PINNED", planned_nodes=("c1",), node_states={"c1": "queued"})
    assert plan([pin], NOW, GRACE, {}, cache_nodes=["cache1"], awake=set()) == []
    assert stages(plan([pin], NOW, GRACE, {}, awake={"c1"})) == [(1, "c1")]


def test_a_pin_that_failed_on_one_node_stays_warm_on_the_others() -> None:
    pin = job(
        kind="pin",
        state="PINNED",
        planned_nodes=("n1", "n2", "n3"),
        node_states={"n1": "failed", "n2": "ready", "n3": "queued"},
    )
    actions = plan([pin], NOW, GRACE, {})
    assert stages(actions) == [(1, "n3")]  # n1 waits for the pin's next refresh
    assert releases(actions) == []
    # A batch job's failed input still fails the job everywhere (rule 1).
    failed = job(planned_nodes=("n1", "n3"), node_states={"n1": "failed", "n3": "queued"})
    assert stages(plan([failed], NOW, GRACE, {})) == []
