"""Hedging (issue 18): a pending job's inputs also go to the nodes likeliest to free first."""

from __future__ import annotations

from hpcstage.core import hedge
from hpcstage.core import plan as planner

MIB = 1 << 20


def _job(**kw: object) -> planner.JobView:
    fields: dict[object, object] = {
        "id": 1,
        "kind": "job",
        "state": "PENDING",
        "planned_nodes": ("n3",),
        "node_states": {"n3": "ready"},
    }
    fields.update(kw)
    return planner.JobView(**fields)  # type: ignore[arg-type]


FREES = {"n1": 300.0, "n2": 200.0, "n3": 100.0, "n4": float("inf")}


def test_free_at_is_the_last_running_jobs_end_per_partition() -> None:
    got = hedge.free_at(
        [
            hedge.Busy("batch", ("n1", "n2"), 300.0),
            hedge.Busy("batch", ("n2",), 200.0),
            hedge.Busy("gpu", ("g1",), None),
        ]
    )
    assert got == {"batch": {"n1": 300.0, "n2": 300.0}, "gpu": {"g1": float("inf")}}


def test_the_nodes_that_free_first_besides_the_plan_are_hedged() -> None:
    assert hedge.hedge_nodes(_job(), FREES, 1, 170 * MIB, 4096 * MIB) == ("n2",)
    # A node whose jobs have no expected end is no hedge.
    assert hedge.hedge_nodes(_job(), FREES, 5, 170 * MIB, 4096 * MIB) == ("n2", "n1")


def test_no_hedge_when_off_too_big_not_yet_staged_or_running() -> None:
    assert hedge.hedge_nodes(_job(), FREES, 0, 170 * MIB, 4096 * MIB) == ()
    assert hedge.hedge_nodes(_job(), FREES, 2, 5000 * MIB, 4096 * MIB) == ()
    staging = _job(node_states={"n3": "running"})
    assert hedge.hedge_nodes(staging, FREES, 2, 170 * MIB, 4096 * MIB) == ()
    running = _job(state="RUNNING", nodes=("n1",))
    assert hedge.hedge_nodes(running, FREES, 2, 170 * MIB, 4096 * MIB) == ()
    assert hedge.hedge_nodes(_job(planned_nodes=()), FREES, 2, 170 * MIB, 4096 * MIB) == ()


def test_the_planner_stages_hedges_while_pending_and_releases_them_once_it_runs() -> None:
    pending = _job(hedge=("n2",))
    actions = planner.plan([pending], now=0.0, grace=0.0, inflight={})
    stages = [a for a in actions if isinstance(a, planner.Stage)]
    assert [(s.node, s.reason.startswith("hedge")) for s in stages] == [("n2", True)]
    staged = _job(hedge=("n2",), node_states={"n3": "ready", "n2": "ready"})
    assert planner.plan([staged], now=0.0, grace=0.0, inflight={}) == []
    # It started on n1: n1 is staged, the plan's node and the hedge are let go.
    started = _job(
        state="RUNNING", nodes=("n1",), hedge=("n2",), node_states={"n3": "ready", "n2": "ready"}
    )
    actions = planner.plan([started], now=0.0, grace=0.0, inflight={})
    assert {(type(a).__name__, a.node) for a in actions if hasattr(a, "node")} == {
        ("Stage", "n1"),
        ("Release", "n2"),
        ("Release", "n3"),
    }
